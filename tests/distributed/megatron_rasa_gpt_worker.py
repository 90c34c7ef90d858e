"""torchrun worker: a real Megatron-core GPTModel with RaSA on a TP x PP (x VPP) layout against the
single-process Hugging Face Llama with RaSA (same base weights via the converter, same adapter).

Checks, on every rank: the adapter init equals HF ``apply_rasa``'s after the same seed; logits (last
stage, gathered over TP), loss, every adapter gradient (TP shards gathered, pool slices of this
stage) and three AdamW steps equal the reference; pool collectives per step are counted. Prints one
``RESULT {json}`` line on global rank 0. Tolerances (fp32): logits/loss 1e-5, gradients and
parameters 1e-5 absolute.
Usage: torchrun --nproc_per_node N megatron_rasa_gpt_worker.py --tp T --pp P [--vpp V] [--sp]
"""
import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from pp_driver import forward_backward, forward_only  # noqa: E402

TOL = 1e-5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    # Test shim (CPU-only torch): Megatron 0.16's rotary embedding and sequence-parallel collectives
    # place tensors on torch.cuda.current_device(); here that device is the CPU.
    torch.cuda.current_device = lambda: "cpu"
    import contextlib

    from megatron.core import parallel_state, tensor_parallel
    # Test shim: under sequence parallelism the embedding forks Megatron's CUDA RNG tracker (for
    # dropout, 0 here), whose states need CUDA to be created; fork into the default CPU RNG instead.
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    from transformers import LlamaConfig, LlamaForCausalLM

    from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa
    from rasa_megatron.megatron import (apply_rasa_megatron, finalize_rasa_grads, gather_pipeline_pools,
                                        megatron_rasa_units)
    from rasa_megatron.megatron.convert import build_gpt_model, hf_to_megatron, transformer_config_from_hf
    from rasa_megatron.megatron.inject import load_hf_adapter_

    tp, pp, vpp = args.tp, args.pp, args.vpp
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None)
    tp_rank, pp_rank = parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_pipeline_model_parallel_rank()
    tp_group, pp_group = parallel_state.get_tensor_model_parallel_group(), parallel_state.get_pipeline_model_parallel_group()

    layers, r, k = 4, 4, 1
    hf_config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                            tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_config).eval()
    base_state = {key: value.clone() for key, value in hf.state_dict().items()}
    rasa = RaSAConfig(r=r, k=k, alpha=8)
    torch.manual_seed(7)
    apply_rasa(hf, rasa)
    init_adapter = {key: p.detach().clone() for key, p in adapter_state_dict(hf).items()}
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_state_dict(hf).values():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)

    # ---- Megatron chunks of this rank ---------------------------------------------------------------
    tconfig = transformer_config_from_hf(hf_config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                         sequence_parallel=args.sp,
                                         **({"virtual_pipeline_model_parallel_size": vpp} if vpp > 1 else {}))
    chunks = []
    for v in range(vpp):
        pre = pp_rank == 0 and v == 0
        post = pp_rank == pp - 1 and v == vpp - 1
        model = build_gpt_model(tconfig, hf_config, pre_process=pre, post_process=post,
                                **({"vp_stage": v} if vpp > 1 else {}))
        state = hf_to_megatron(base_state, hf_config, tp_rank, tp, pp_rank, pp,
                               **({"vp_stage": v, "vpp_size": vpp} if vpp > 1 else {}))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not m.endswith("_extra_state")]
        assert not missing and not unexpected, (missing, unexpected)
        chunks.append(model)
    torch.manual_seed(7)
    apply_rasa_megatron(chunks, rasa)
    units = megatron_rasa_units(chunks)
    worst = {"init": 0.0, "logits": 0.0, "loss": 0.0, "grad": 0.0, "param": 0.0}

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

    # ---- data: 2 micro-batches of [2, 12] ----------------------------------------------------------
    seq, batch, micro = 12, 2, 2
    data = torch.randint(0, hf_config.vocab_size, (micro, batch, seq + 1), generator=torch.Generator().manual_seed(3))
    micro_batches = [{"input_ids": d[:, :-1], "labels": d[:, 1:], "position_ids": torch.arange(seq).expand(batch, seq)}
                     for d in data]

    hf.train()
    ref_params = [p for p in hf.parameters() if p.requires_grad]
    ref_opt = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.0)
    meg_params = []
    seen = set()
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
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        meg_opt.step()
        meg_opt.zero_grad(set_to_none=True)
        compare_adapter("param", {key: p.detach() for key, p in adapter_state_dict(hf).items()}, grads=False)
    for kind in worst:  # the worst over all ranks (logits and loss are checked on the last stage)
        value = torch.tensor(worst[kind], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        worst[kind] = value.item()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"tp": tp, "pp": pp, "vpp": vpp, "sp": args.sp, "worst": worst,
                                      "collectives_per_step": collectives, "units": len(units)}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
