"""torchrun worker (4 processes, TP2 x PP2): the adapter dropout masks of a Megatron GPTModel with RaSA,
recorded in one training-mode forward after the engine's seeding (``seed_dropout_streams``): the fused
path keeps no mask, so each unit's Philox ``(seed, offset)`` draw is recorded and its mask regenerated
with the pure-torch oracle (bit-identical to the kernels, tests/unit/ops).

Reports, per kind of comparison, the fraction of elements where two masks disagree (independent masks
with drop probability p = 0.5 disagree on ~0.5 of their elements; identical masks on 0):
q/k/v (and gate/up) of one layer against each other; a column adapter's mask on the two TP ranks
(must be equal: both ranks drop from the same total input); a row adapter's mask on the two TP ranks
(its input is a different shard per rank: must be independent); the two pipeline stages' first
layers (must be independent: each stage has its own seed). And every mask's drop fraction.
Prints one ``RESULT {json}`` line on global rank 0.
"""
import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from megatron_common import close_cpu_megatron, hf_reference, init_cpu_megatron, megatron_chunks  # noqa: E402
from megatron_common import micro_batches as make_micro_batches  # noqa: E402
from pp_driver import forward_only  # noqa: E402

P = 0.5


def main():
    from rasa_megatron.megatron import gather_pipeline_pools, megatron_rasa_units
    from rasa_megatron.megatron.engine import seed_dropout_streams
    from rasa_megatron.ops import philox

    parallel_state = init_cpu_megatron(2, 2)
    tp_group, pp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_pipeline_model_parallel_group()
    ref = hf_reference()
    ref.rasa = dataclasses.replace(ref.rasa, dropout=P)
    chunks = megatron_chunks(ref, parallel_state, 2, 2)
    draws = {}  # the fused path stores no mask: record each unit's Philox (seed, offset), regenerate below
    units = megatron_rasa_units(chunks)
    for (index, path), unit in units.items():
        def record(device, key=(index, path), draw=unit.draw_dropout_seed):
            draws[key] = draw(device)
            return draws[key]
        unit.draw_dropout_seed = record
    for chunk in chunks:
        chunk.train()
    seed_dropout_streams(42)
    gather_pipeline_pools(chunks)
    batches = make_micro_batches(ref.config.vocab_size, count=1)
    seq, batch = batches[0]["input_ids"].shape[1], batches[0]["input_ids"].shape[0]
    forward_only(chunks, batches, pp_group, (seq, batch, ref.config.hidden_size), torch.float32)
    masks = {key: ~philox.keep_mask(torch.empty(seq * batch, units[key].in_local), seed, offset,
                                    philox.dropout_threshold(P))
             for key, (seed, offset) in draws.items()}

    def disagree(a, b):
        return (a != b).float().mean().item()

    def peer(mask, group):  # the other rank's mask of the same unit
        parts = [torch.empty_like(mask) for _ in range(2)]
        dist.all_gather(parts, mask.contiguous(), group=group)
        return parts[1 - dist.get_rank(group)]

    stats = {"drop_fraction": [m.float().mean().item() for m in masks.values()], "qkv": [], "gate_up": [],
             "column_across_tp": [], "row_across_tp": [], "across_pp": []}
    for (index, path), mask in sorted(masks.items()):
        if path.endswith(("q_proj", "gate_proj")):
            for other in (("k_proj", "v_proj") if path.endswith("q_proj") else ("up_proj",)):
                kind = "qkv" if path.endswith("q_proj") else "gate_up"
                stats[kind].append(disagree(mask, masks[(index, path.rsplit(".", 1)[0] + "." + other)]))
        row = path.endswith(("o_proj", "down_proj"))
        stats["row_across_tp" if row else "column_across_tp"].append(disagree(mask, peer(mask, tp_group)))
    first = min(index for index, _ in masks)
    stats["across_pp"].append(disagree(masks[(first, "self_attn.q_proj")], peer(masks[(first, "self_attn.q_proj")],
                                                                                   pp_group)))
    everything = [None] * dist.get_world_size()
    dist.all_gather_object(everything, stats)
    if dist.get_rank() == 0:
        merged = {key: [v for rank_stats in everything for v in rank_stats[key]] for key in stats}
        print("RESULT " + json.dumps({"p": P, **merged}), flush=True)
    close_cpu_megatron()


if __name__ == "__main__":
    main()
