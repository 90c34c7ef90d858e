"""torchrun worker: Megatron-core TP RaSA layers (fused qkv, SwiGLU fc1, row proj/fc2) on gloo
against the single-process Hugging Face RaSA layers of a tiny Llama with the same weights.

Every rank builds the same reference (same seeds), its own TP shards, runs forward and backward,
calls finalize_rasa_grads, and checks outputs, every adapter gradient (shards gathered) and a
merge round trip. Prints one ``RESULT {json}`` line on rank 0; exits non-zero on a mismatch.
Usage: torchrun --nproc_per_node 2 megatron_tp_worker.py [--sequence-parallel] [--count-collectives]
"""
import argparse
import json
import sys

import torch
import torch.distributed as dist

TOL = 1e-10  # fp64 on both sides


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequence-parallel", action="store_true")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    from megatron.core import ModelParallelConfig, parallel_state
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from transformers import LlamaConfig, LlamaForCausalLM

    from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa, rasa_layers
    from rasa_megatron.megatron import (RaSAColumnParallelLinear, RaSARowParallelLinear, ShardedRankPool, ShardedRaSA,
                                        finalize_rasa_grads)
    from rasa_megatron.megatron.sharding import COLUMN, ROW

    tp = dist.get_world_size()
    rank = dist.get_rank()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    sp = args.sequence_parallel
    if sp:
        # Test shim (CPU only): Megatron's sequence-parallel all-gather / reduce-scatter allocate
        # their output with device=torch.cuda.current_device(); on a CPU-only torch that raises. The
        # collectives themselves are Megatron's, unchanged, running on gloo.
        torch.cuda.current_device = lambda: "cpu"
    dtype = torch.float64

    # ---- reference: HF tiny Llama with RaSA on the 7 linears, random adapter values ----------------
    hidden, heads, groups, head_dim, ffn, layers, r, k = 16, 4, 2, 4, 24, 2, 4, 1
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim)).to(dtype)
    apply_rasa(hf, RaSAConfig(r=r, k=k, alpha=8), adapter_dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapter_state_dict(hf).values():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * 0.3)
    units = rasa_layers(hf)
    seq, batch = 6, 2
    inputs = {name: torch.randn(seq, batch, units[f"model.layers.0.{path}"].in_features, generator=gen, dtype=dtype)
              for name, path in [("attn", "self_attn.q_proj"), ("o", "self_attn.o_proj"), ("mlp", "mlp.gate_proj"),
                                 ("down", "mlp.down_proj")]}
    module_input = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
                    "up_proj": "mlp", "down_proj": "down"}
    probes = {}  # random cotangents: loss = sum <output, probe>
    ref_out = {}
    for name, unit in units.items():
        leaf = name.rsplit(".", 1)[-1]
        out = unit(inputs[module_input[leaf]])
        probes[name] = torch.randn(out.shape, generator=gen, dtype=dtype)
        ref_out[name] = out.detach()
        (out * probes[name]).sum().backward()
    ref_grads = {key: p.grad.clone() for key, p in adapter_state_dict(hf).items()}

    # ---- Megatron side ------------------------------------------------------------------------------
    config = ModelParallelConfig(tensor_model_parallel_size=tp, sequence_parallel=sp, use_cpu_initialization=True,
                                 params_dtype=dtype, perform_initialization=True)

    def init(w):
        return torch.nn.init.zeros_(w)

    pools = {}
    parallel_of = {"q_proj": COLUMN, "k_proj": COLUMN, "v_proj": COLUMN, "gate_proj": COLUMN, "up_proj": COLUMN,
                   "o_proj": ROW, "down_proj": ROW}
    for path, pool in [(p, hf.rasa_pools[p.split(".")[0]][p.split(".")[1]]) for p in
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]:
        pools[path] = ShardedRankPool(pool.in_features, pool.out_features, pool.pool_rank, layers,
                                      parallel_of[path.split(".")[1]], rank, tp, dtype=dtype)

    def adapter_for(index, path):
        unit = units[f"model.layers.{index}.{path}"]
        adapter = ShardedRaSA(unit.in_features, unit.out_features, r - k, pools[path], 8.0,
                              parallel_of[path.split(".")[1]], rank, tp, layer_index=index, dtype=dtype)
        adapter.load_full_(*unit._factors())
        return adapter

    def chunk(t, dim):
        return t.chunk(tp, dim=dim)[rank]

    mlayers = []
    for index in range(layers):
        attn, mlp = hf.model.layers[index].self_attn, hf.model.layers[index].mlp
        qkv = ColumnParallelLinear(hidden, (heads + 2 * groups) * head_dim, config=config, init_method=init, bias=False,
                                   gather_output=False)
        fused = torch.cat([attn.q_proj.base_layer.weight.view(groups, -1, hidden),
                           attn.k_proj.base_layer.weight.view(groups, -1, hidden),
                           attn.v_proj.base_layer.weight.view(groups, -1, hidden)], dim=1).reshape(-1, hidden)
        fc1 = ColumnParallelLinear(hidden, 2 * ffn, config=config, init_method=init, bias=False, gather_output=False)
        proj = RowParallelLinear(heads * head_dim, hidden, config=config, init_method=init, bias=False,
                                 input_is_parallel=True, skip_bias_add=True)
        fc2 = RowParallelLinear(ffn, hidden, config=config, init_method=init, bias=False, input_is_parallel=True,
                                skip_bias_add=True)
        with torch.no_grad():
            qkv.weight.copy_(chunk(fused, 0))
            fc1.weight.copy_(torch.cat([chunk(mlp.gate_proj.base_layer.weight, 0), chunk(mlp.up_proj.base_layer.weight, 0)]))
            proj.weight.copy_(chunk(attn.o_proj.base_layer.weight, 1))
            fc2.weight.copy_(chunk(mlp.down_proj.base_layer.weight, 1))
        mlayers.append({
            "qkv": RaSAColumnParallelLinear(qkv, {n: adapter_for(index, f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj")},
                                            layout="qkv", query_groups_local=groups // tp,
                                            heads_per_group=heads // groups, head_dim=head_dim),
            "fc1": RaSAColumnParallelLinear(fc1, {n: adapter_for(index, f"mlp.{n}") for n in ("gate_proj", "up_proj")},
                                            layout="glu"),
            "proj": RaSARowParallelLinear(proj, adapter_for(index, "self_attn.o_proj")),
            "fc2": RaSARowParallelLinear(fc2, adapter_for(index, "mlp.down_proj")),
        })

    def seq_local(t):  # sequence parallel: the column input / row output is this rank's sequence chunk
        return chunk(t, 0) if sp else t

    worst = {"output": 0.0, "grad": 0.0, "merge": 0.0}

    def check(kind, got, want, what):
        diff = (got - want).abs().max().item()
        worst[kind] = max(worst[kind], diff)
        if diff > TOL:
            raise AssertionError(f"rank {rank}: {what} differs by {diff:.3g}")

    g, hpg, d = groups // tp, heads // groups, head_dim
    outputs = {}
    for index, m in enumerate(mlayers):
        prefix = f"model.layers.{index}."
        out_qkv, _ = m["qkv"](seq_local(inputs["attn"]))
        grouped = out_qkv.view(seq, batch, g, (hpg + 2) * d)
        outputs[prefix + "self_attn.q_proj"] = grouped[..., : hpg * d].reshape(seq, batch, -1)
        outputs[prefix + "self_attn.k_proj"] = grouped[..., hpg * d:(hpg + 1) * d].reshape(seq, batch, -1)
        outputs[prefix + "self_attn.v_proj"] = grouped[..., (hpg + 1) * d:].reshape(seq, batch, -1)
        out_fc1, _ = m["fc1"](seq_local(inputs["mlp"]))
        outputs[prefix + "mlp.gate_proj"], outputs[prefix + "mlp.up_proj"] = out_fc1.chunk(2, dim=-1)
        outputs[prefix + "self_attn.o_proj"], _ = m["proj"](chunk(inputs["o"], 2))
        outputs[prefix + "mlp.down_proj"], _ = m["fc2"](chunk(inputs["down"], 2))
    loss = 0
    for name, out in outputs.items():
        leaf = name.rsplit(".", 1)[-1]
        want = ref_out[name]
        probe = probes[name]
        if parallel_of[leaf] == COLUMN:
            want, probe = chunk(want, 2), chunk(probe, 2)
        else:
            want, probe = seq_local(want), seq_local(probe)
        check("output", out, want, f"output of {name}")
        loss = loss + (out * probe).sum()
    loss.backward()
    calls = finalize_rasa_grads([torch.nn.ModuleList([torch.nn.ModuleDict(m) for m in mlayers])],
                                parallel_state.get_tensor_model_parallel_group())["tp_all_reduce"]

    def gathered(t, dim):
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim=dim)

    checked = 0
    for index, m in enumerate(mlayers):
        named = {f"self_attn.{n}": a for n, a in m["qkv"].adapters.items()}
        named.update({f"mlp.{n}": a for n, a in m["fc1"].adapters.items()})
        named["self_attn.o_proj"], named["mlp.down_proj"] = m["proj"].adapter, m["fc2"].adapter
        for path, adapter in named.items():
            prefix = f"model.layers.{index}.{path}"
            col = adapter.parallel == COLUMN
            check("grad", gathered(adapter.B_private.grad, 0) if col else adapter.B_private.grad,
                  ref_grads[f"{prefix}.B_private"], f"grad of {prefix}.B_private")
            check("grad", adapter.A_private.grad if col else gathered(adapter.A_private.grad, 1),
                  ref_grads[f"{prefix}.A_private"], f"grad of {prefix}.A_private")
            check("grad", adapter.diag.grad, ref_grads[f"{prefix}.diag"], f"grad of {prefix}.diag")
            checked += 3
    for path, pool in pools.items():
        col = pool.parallel == COLUMN
        check("grad", pool.A_shared.grad if col else gathered(pool.A_shared.grad, 1),
              ref_grads[f"rasa_pools.{path}.A_shared"], f"grad of pool {path}.A_shared")
        check("grad", gathered(pool.B_shared.grad, 0) if col else pool.B_shared.grad,
              ref_grads[f"rasa_pools.{path}.B_shared"], f"grad of pool {path}.B_shared")
        checked += 2

    # collectives: a RaSA layer issues exactly the base layer's (same calls, same sizes)
    def traffic(layer_pair, x_col, x_row):
        from megatron.core.tensor_parallel import layers as megatron_layers
        from megatron.core.tensor_parallel import mappings

        log = []
        originals = []
        # torch.distributed.all_reduce, and the all-gather / reduce-scatter functions Megatron's
        # mappings bound at import time
        for owner, fn in ((dist, "all_reduce"), (mappings, "dist_all_gather_func"),
                          (mappings, "dist_reduce_scatter_func"), (megatron_layers, "dist_all_gather_func"),
                          (megatron_layers, "dist_reduce_scatter_func")):
            original = getattr(owner, fn)
            originals.append((owner, fn, original))

            def counted(*a, _fn=fn, _orig=original, **kw):
                log.append((_fn, a[0].numel()))
                return _orig(*a, **kw)
            setattr(owner, fn, counted)
        try:
            col, row = layer_pair
            out_col, _ = col(x_col)
            out_row, _ = row(x_row)
            (out_col.sum() + out_row.sum()).backward()
        finally:
            for owner, fn, original in originals:
                setattr(owner, fn, original)
        return sorted(log)

    x_col = seq_local(inputs["attn"]).clone().requires_grad_(True)
    x_row = chunk(inputs["down"], 2).clone().requires_grad_(True)
    with_rasa = traffic((mlayers[0]["qkv"], mlayers[0]["fc2"]), x_col, x_row)
    bare = traffic((mlayers[0]["qkv"].base_layer, mlayers[0]["fc2"].base_layer), x_col, x_row)
    # never more calls or bigger tensors than the bare layers (under sequence parallelism fewer: the
    # column wrapper keeps the gathered input for the adapter's dA instead of re-gathering it in backward)
    from collections import Counter
    if Counter(with_rasa) - Counter(bare):
        raise AssertionError(f"rank {rank}: RaSA layers communicate {with_rasa}, the bare Megatron layers {bare}")

    # merge: the fused base weights then give the adapted outputs on their own
    with torch.no_grad():
        for index, m in enumerate(mlayers):
            before, _ = m["qkv"](seq_local(inputs["attn"]))
            before_row, _ = m["fc2"](chunk(inputs["down"], 2))
            for adapter in list(m["qkv"].adapters.values()) + [m["fc2"].adapter]:
                adapter.merge()
            after, _ = m["qkv"](seq_local(inputs["attn"]))
            after_row, _ = m["fc2"](chunk(inputs["down"], 2))
            check("merge", after, before, f"merged qkv of layer {index}")
            check("merge", after_row, before_row, f"merged fc2 of layer {index}")
    if rank == 0:
        print("RESULT " + json.dumps({"tp": tp, "sequence_parallel": sp, "worst": worst, "grads_checked": checked, "collectives_rasa": with_rasa, "collectives_bare": bare,
                                      "finalize_all_reduces": calls}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
