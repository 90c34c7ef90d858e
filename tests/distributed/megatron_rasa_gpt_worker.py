"""torchrun worker: a real Megatron-core GPTModel with RaSA on a TP x PP (x VPP) layout against the
single-process Hugging Face Llama with RaSA (same base weights via the converter, same adapter).

Checks, on every rank: the adapter init equals HF ``apply_rasa``'s after the same seed; logits (last
stage, gathered over TP), loss, every adapter gradient (TP shards gathered, pool slices of this
stage) and three AdamW steps equal the reference; the global gradient norm as Megatron's optimizers
take it (the engine's ``global_grad_norm``: TP duplicates dropped by Megatron's
``tensor_model_parallel`` attribute test, ``get_grad_norm_fp32`` over the model-parallel group)
equals the reference's; pool collectives per step are counted. Prints one ``RESULT {json}`` line on global rank 0. Tolerances (fp32): logits/loss 1e-5,
gradients and parameters 1e-5 absolute, gradient norm 1e-5 relative.
With ``--spec`` the model is built from ``rasa_layer_spec`` instead of adapted after building.
Usage: torchrun --nproc_per_node N megatron_rasa_gpt_worker.py --tp T --pp P [--vpp V] [--sp] [--spec]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from megatron_common import close_cpu_megatron, hf_reference, init_cpu_megatron, megatron_chunks, report_worst  # noqa: E402
from megatron_common import micro_batches as make_micro_batches  # noqa: E402
from pp_driver import forward_backward, forward_only  # noqa: E402

TOL = 1e-5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--spec", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from rasa_megatron import adapter_state_dict
    from rasa_megatron.megatron import finalize_rasa_grads, gather_pipeline_pools, megatron_rasa_units
    from rasa_megatron.megatron.hf_adapter import gather_hf_adapter, load_hf_adapter_
    from rasa_megatron.megatron.grads import global_grad_norm

    tp, pp, vpp = args.tp, args.pp, args.vpp
    parallel_state = init_cpu_megatron(tp, pp, vpp)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    tp_group, pp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_pipeline_model_parallel_group()
    ref = hf_reference()
    hf, hf_config, init_adapter = ref.model, ref.config, ref.init_adapter
    chunks = megatron_chunks(ref, parallel_state, tp, pp, vpp, args.sp, spec=args.spec)
    units = megatron_rasa_units(chunks)
    worst = {"init": 0.0, "logits": 0.0, "loss": 0.0, "grad": 0.0, "grad_norm": 0.0, "param": 0.0}

    def check(kind, got, want, what, tol=TOL):
        diff = (got.float() - want.float()).abs().max().item()
        worst[kind] = max(worst[kind], diff)
        if diff > tol:
            raise AssertionError(f"rank {dist.get_rank()}: {what} differs by {diff:.3g}")

    def gather_tp(t, dim):
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=tp_group)
        return torch.cat(parts, dim=dim)

    def full_of(unit, name, tensor):
        """A Megatron shard -> the full single-process tensor (TP-gathered)."""
        if name in ("A_private", "A_shared") and unit.parallel == "row":
            return gather_tp(tensor, 1)
        if name in ("B_private", "B_shared") and unit.parallel == "column":
            return gather_tp(tensor, 0)
        return tensor

    def compare_adapter(kind, reference, grads: bool):
        for (index, path), unit in sorted(units.items()):
            prefix = f"model.layers.{index}.{path}"
            for name in ("A_private", "B_private", "diag"):
                t = getattr(unit, name)
                t = t.grad if grads else t.detach()
                check(kind, full_of(unit, name, t), reference[f"{prefix}.{name}"], f"{kind} {prefix}.{name}")
        for (index, path), unit in sorted(units.items()):
            pool = unit.pool
            rows = pool.owned_rows()
            for name in ("A_shared", "B_shared"):
                t = getattr(pool, name)
                t = t.grad if grads else t.detach()
                want = reference[f"rasa_pools.{path}.{name}"]
                want = want.index_select(0 if name == "A_shared" else 1, rows)
                check(kind, full_of(unit, name, t), want, f"{kind} pool {path}.{name}")

    compare_adapter("init", init_adapter, grads=False)
    load_hf_adapter_(chunks, {key: p.detach() for key, p in adapter_state_dict(hf).items()})
    # Megatron -> HF adapter: the shards of every rank assemble to the HF adapter exactly
    assembled = gather_hf_adapter(chunks)
    round_trip = None
    if assembled is not None:
        reference = adapter_state_dict(hf)
        assert set(assembled) == set(reference), sorted(set(assembled) ^ set(reference))[:4]
        round_trip = max((assembled[key] - reference[key].detach()).abs().max().item() for key in reference)

    # ---- data: 2 micro-batches of [2, 12] ----------------------------------------------------------
    seq, batch, micro = 12, 2, 2
    micro_batches = make_micro_batches(hf_config.vocab_size, micro, batch, seq)

    hf.train()
    ref_params = [p for p in hf.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0)
    meg_params = []
    seen = set()
    trainable = {id(p) for chunk in chunks for p in chunk.parameters() if p.requires_grad}
    rasa_params = {id(p) for unit in units.values() for p in unit.parameters()} | {
        id(p) for unit in units.values() if unit.pool is not None for p in unit.pool.parameters()}
    assert trainable <= rasa_params, "a base parameter is trainable"
    for chunk in chunks:
        for p in chunk.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                meg_params.append(p)
    meg_opt = torch.optim.AdamW(meg_params, lr=1e-2, weight_decay=0.0)
    for chunk in chunks:
        chunk.train()
    collectives = []
    last_rank = pp_rank == pp - 1
    ref_logits = []
    hidden_shape = (seq // (tp if args.sp else 1), batch, hf_config.hidden_size)
    for step in range(args.steps):
        # reference: mean token loss per micro-batch, averaged over micro-batches
        ref_losses = []
        for mb in micro_batches:
            logits = hf(input_ids=mb["input_ids"]).logits
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), mb["labels"].reshape(-1))
            (loss / micro).backward()
            ref_losses.append(loss.detach())
            if step == 0:
                ref_logits.append(logits.detach())
        ref_grads = {key: p.grad.clone() for key, p in adapter_state_dict(hf).items()}
        counts = {"pp_all_gather": gather_pipeline_pools(chunks, pp_group)}
        if step == 0:  # logits (last stage, gathered over the vocab shards); dropout is 0, so train mode is fine
            for got, want in zip(forward_only(chunks, micro_batches, pp_group, hidden_shape, torch.float32), ref_logits):
                check("logits", gather_tp(got, -1), want, "logits")
        losses = forward_backward(chunks, micro_batches, pp_group, hidden_shape,
                                  torch.float32, lambda per_token: per_token.float().mean() / micro)
        counts.update(finalize_rasa_grads(chunks, tp_group, pp_group))
        collectives.append(counts)
        if last_rank:
            for got, want in zip(losses, ref_losses):
                check("loss", got * micro, want, f"loss at step {step}")
        compare_adapter("grad", ref_grads, grads=True)
        want_norm = torch.stack([g.double().pow(2).sum() for g in ref_grads.values()]).sum().sqrt()
        got_norm = global_grad_norm(meg_params, parallel_state)
        check("grad_norm", torch.tensor(got_norm / want_norm.item() - 1.0), torch.tensor(0.0), "gradient norm")
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        meg_opt.step()
        meg_opt.zero_grad(set_to_none=True)
        compare_adapter("param", {key: p.detach() for key, p in adapter_state_dict(hf).items()}, grads=False)
    report_worst(worst)  # over all ranks: logits and loss are checked on the last stage
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": tp, "pp": pp, "vpp": vpp, "sp": args.sp, "spec": args.spec, "worst": worst,
                                      "collectives_per_step": collectives, "units": len(units),
                                      "adapter_round_trip": round_trip}), flush=True)
    close_cpu_megatron()


if __name__ == "__main__":
    sys.exit(main())
