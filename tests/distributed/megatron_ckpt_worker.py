"""torchrun worker: Megatron dist-checkpointing of a GPTModel with RaSA across layouts.

``--save DIR``: the reference adapter is loaded into the model on this TP x PP layout and saved with
``megatron.core.dist_checkpointing``. ``--load DIR``: a model with a *different* fresh adapter
(another seed) on this layout loads the checkpoint; its logits must equal the single-process HF
reference's (fp32, 1e-5) and every adapter tensor the reference's slice (exact). Prints one
``RESULT {json}`` line on global rank 0.
``--spec``: the model is built from ``rasa_layer_spec`` (else adapted after building); the two
store the same keys, so either loads the other's checkpoint. ``--non-homogeneous``: Megatron's
per-layer checkpoint keys (``metadata={"non_homogeneous_layers": True}``) instead of layer-stacked ones.
Usage: torchrun --nproc_per_node N megatron_ckpt_worker.py --tp T --pp P (--save DIR | --load DIR)
       [--spec] [--non-homogeneous]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from megatron_common import close_cpu_megatron, hf_reference, init_cpu_megatron, megatron_chunks  # noqa: E402
from megatron_common import micro_batches, report_worst  # noqa: E402
from pp_driver import forward_only  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save")
    mode.add_argument("--load")
    parser.add_argument("--spec", action="store_true")
    parser.add_argument("--non-homogeneous", action="store_true")
    args = parser.parse_args()
    metadata = {"non_homogeneous_layers": True} if args.non_homogeneous else None
    from megatron.core import dist_checkpointing

    from rasa_megatron import adapter_state_dict
    from rasa_megatron.megatron import gather_pipeline_pools, megatron_rasa_units
    from rasa_megatron.megatron.hf_adapter import load_hf_adapter_

    parallel_state = init_cpu_megatron(args.tp, args.pp)
    ref = hf_reference()
    reference_adapter = {key: p.detach() for key, p in adapter_state_dict(ref.model).items()}
    chunks = megatron_chunks(ref, parallel_state, args.tp, args.pp, adapter_seed=11 if args.load else 7, spec=args.spec)
    (model,) = chunks
    worst = {"logits": 0.0, "adapter": 0.0}
    if args.save:
        load_hf_adapter_(chunks, reference_adapter)
        dist_checkpointing.save(model.sharded_state_dict(metadata=metadata), args.save)
    else:
        loaded = dist_checkpointing.load(model.sharded_state_dict(metadata=metadata), args.load)
        model.load_state_dict(loaded)
        # every adapter tensor equals the reference's slice for this rank
        expected = megatron_chunks(ref, parallel_state, args.tp, args.pp, adapter_seed=13)
        load_hf_adapter_(expected, reference_adapter)
        got_units, want_units = megatron_rasa_units(chunks), megatron_rasa_units(expected)
        for key, unit in got_units.items():
            want = want_units[key]
            for name in ("A_private", "B_private", "diag"):
                worst["adapter"] = max(worst["adapter"], (getattr(unit, name) - getattr(want, name)).abs().max().item())
            for name in ("A_shared", "B_shared"):
                diff = (getattr(unit.pool, name) - getattr(want.pool, name)).abs().max().item()
                worst["adapter"] = max(worst["adapter"], diff)
        batches = micro_batches(ref.config.vocab_size, count=1)
        with torch.no_grad():
            want_logits = ref.model(input_ids=batches[0]["input_ids"]).logits
        gather_pipeline_pools(chunks, parallel_state.get_pipeline_model_parallel_group())
        outputs = forward_only(chunks, batches, parallel_state.get_pipeline_model_parallel_group(),
                               (12, 2, ref.config.hidden_size), torch.float32)
        for logits in outputs:
            parts = [torch.empty_like(logits) for _ in range(args.tp)]
            dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            worst["logits"] = (torch.cat(parts, dim=-1) - want_logits).abs().max().item()
    report_worst(worst)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": args.tp, "pp": args.pp, "mode": "save" if args.save else "load",
                                      "spec": args.spec,
                                      "worst": worst}), flush=True)
    close_cpu_megatron()


if __name__ == "__main__":
    sys.exit(main())
