"""torchrun worker (2 processes): RaSA refuses to train when a loop would skip its gradient reductions.

At TP2 (partial gradients of replicated factors) and at PP2 (pipeline-sharded pools) a training-mode
forward with Megatron's own ``finalize_model_grads`` installed as ``config.finalize_model_grads_func``
(what Megatron-LM's ``train()`` does) raises, naming the fix; with ``finalize_model_grads_with_rasa``
it runs. At PP2 a forward on a gathered pool whose slices changed since the gather (an optimizer step
without RaSA's finalisation) raises too. Prints one ``RESULT {json}`` line on rank 0.
Usage: torchrun --nproc_per_node 2 megatron_guard_worker.py --tp T --pp P
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from megatron_common import close_cpu_megatron, hf_reference, init_cpu_megatron, megatron_chunks  # noqa: E402
from megatron_common import micro_batches as make_micro_batches  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args()
    from megatron.core.distributed import finalize_model_grads

    from rasa_megatron.megatron import finalize_model_grads_with_rasa, gather_pipeline_pools
    from rasa_megatron.megatron.pools import ShardedRankPool

    parallel_state = init_cpu_megatron(args.tp, args.pp)
    ref = hf_reference()
    chunks = megatron_chunks(ref, parallel_state, args.tp, args.pp)
    batches = make_micro_batches(ref.config.vocab_size, count=1)
    shape = (batches[0]["input_ids"].shape[1], batches[0]["input_ids"].shape[0], ref.config.hidden_size)
    for chunk in chunks:
        chunk.train()

    def stage_forward():  # this rank's stage on its own (no p2p: a rank that raises cannot hang the other)
        model, batch = chunks[0], batches[0]
        if parallel_state.get_pipeline_model_parallel_rank() > 0:
            model.set_input_tensor(torch.randn(shape, requires_grad=True))
        model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None)

    def forward():
        gather_pipeline_pools(chunks)
        try:
            stage_forward()
            return "ran"
        except RuntimeError as err:
            return str(err)

    config = chunks[0].config
    config.finalize_model_grads_func = finalize_model_grads
    megatron_own = forward()
    config.finalize_model_grads_func = finalize_model_grads_with_rasa
    ours = forward()
    stale = None
    if args.pp > 1:
        gather_pipeline_pools(chunks)
        pool = next(m for m in chunks[0].modules() if isinstance(m, ShardedRankPool))
        with torch.no_grad():
            pool.A_shared.add_(1e-3)  # what an optimizer step does in place
        try:
            stage_forward()
            stale = "ran"
        except RuntimeError as err:
            stale = str(err)
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, {"megatron_own": megatron_own, "ours": ours, "stale": stale})
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(results), flush=True)
    close_cpu_megatron()


if __name__ == "__main__":
    main()
