"""CPU training-step time: frozen base vs LoRA vs PEFT LoRA vs RaSA, as ratios measured side by side.

One process, a Llama with SmolLM2-135M's shape (vocab 49152, hidden 576, intermediate 1536, 30 layers,
9 heads, 3 kv heads, tied embeddings), random fp32 weights, one fixed random batch of token ids.

A step is forward + causal-LM loss + backward + AdamW step on the trainable parameters. The frozen
base has no trainable parameters, so its step is defined as forward + loss + backward with the
input embeddings' output requiring grad (no optimizer): it pays the activation-gradient backward
through every layer that each adapter method also pays, and the ratios isolate the adapters' cost.

Variants:
    frozen base                      the step above, no adapter
    LoRA r=8 (ours, k=0)             apply_rasa(RaSAConfig(r=8, k=0)): LoRA with a trainable diagonal
    PEFT LoRA r=8                    peft.LoraConfig(r=8, lora_alpha=16) on the 7 linears (PEFT's default:
                                     fp32 adapters on a bf16 model)
    PEFT LoRA r=8 bf16               the same with autocast_adapter_dtype=False (adapters in the model dtype)
    PEFT LoRA r=39                   PEFT LoRA at RaSA r=8 k=1's effective rank on 32 layers (model dtype)
    RaSA r=8 k=1                     apply_rasa(RaSAConfig(r=8, k=1)): private rank 7 + pool of L; the fused
                                     path (rasa_megatron/ops) with the csrc extension when it is built
    RaSA r=8 k=1, torch fallback     the fused path with RASA_KERNELS=off (no extension kernels)
    RaSA r=8 k=1, reference path     RASA_FUSED=0: functional.rasa_linear through autograd (before the fused path)
    RaSA r=8 k=1, split GEMMs        no factor copy: one GEMM chain for the private ranks and one for
                                     the pool, summed (the library concatenates the small factors,
                                     [A_i; A_S] and [B_i | B_S], and runs one rank-(r-k+Lk) chain)
    LoRA at RaSA's effective rank    (opt-in, --variants) ours with k=0 and r = r-k+Lk

The variants run round-robin, one step of each per round, starting one variant later every round,
so machine noise (other processes on the box) hits them alike; after --warmup rounds the median of
--steps timed rounds is reported, with the ratio to the frozen base and RaSA / our LoRA.

    python bench/step_time.py                     # SmolLM2-135M shape, 8 x 96 tokens
    python bench/step_time.py --preset llama8b --device cuda --dtype bf16 --variants ...   # tools/gpu_check.sh
    python bench/step_time.py --layers 2 --hidden 64 --intermediate 128 --heads 4 --kv-heads 2 \\
        --vocab 256 --seq 16 --batch 2 --warmup 1 --steps 2
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rasa_megatron import LLAMA_LINEARS, RaSAConfig, RaSALinear, apply_rasa  # noqa: E402
from rasa_megatron.functional import rasa_linear_split  # noqa: E402
from rasa_megatron.ops import has_kernel, load_extension  # noqa: E402

FROZEN = "frozen base"
OUR_LORA = "LoRA r=8 (ours, k=0)"
PEFT_LORA = "PEFT LoRA r=8"
RASA = "RaSA r=8 k=1"
RASA_SPLIT = "RaSA r=8 k=1, split GEMMs (no factor copy)"
RASA_FALLBACK = "RaSA r=8 k=1, torch fallback"
RASA_REFERENCE = "RaSA r=8 k=1, reference path"
PEFT_LORA_BF16 = "PEFT LoRA r=8 bf16"
PEFT_LORA_39 = "PEFT LoRA r=39"
LORA_EFFECTIVE = "LoRA at RaSA's effective rank"
DEFAULT_VARIANTS = (FROZEN, OUR_LORA, PEFT_LORA, RASA, RASA_REFERENCE)
GPU_VARIANTS = (FROZEN, PEFT_LORA, PEFT_LORA_BF16, PEFT_LORA_39, RASA, RASA_FALLBACK, RASA_REFERENCE)
ALL_VARIANTS = (FROZEN, OUR_LORA, PEFT_LORA, PEFT_LORA_BF16, PEFT_LORA_39, RASA, RASA_FALLBACK, RASA_REFERENCE,
                RASA_SPLIT, LORA_EFFECTIVE)
#: environment each variant's steps run under (the fused path reads these on every call)
VARIANT_ENV = {RASA_FALLBACK: {"RASA_KERNELS": "off"}, RASA_REFERENCE: {"RASA_FUSED": "0"}}
RANK, SHARED_RANK, ALPHA = 8, 1, 16
PRESETS = {"smollm2": dict(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, batch=8, seq=96),
           # Llama-3.1-8B's layer shape, 4 layers; a 4096-token vocabulary so the LM head (38% of a 4-layer
           # model's FLOPs at the real 128256) does not dilute the per-layer ratios the 32-layer model has
           "llama8b": dict(layers=4, hidden=4096, intermediate=14336, heads=32, kv_heads=8, vocab=4096, batch=2,
                           seq=2048)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SplitRaSALinear(RaSALinear):
    """RaSA without concatenating the factors: one GEMM chain for the private part, one for the pool."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        adapter_input = self.dropout(x).to(self.diag.dtype)
        return result + rasa_linear_split(adapter_input, *self._factors()).to(result.dtype)


def build_model(args) -> torch.nn.Module:
    """The same random Llama for every variant (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=True,
                         max_position_embeddings=max(2048, args.seq))
    return LlamaForCausalLM(config).to(device=args.device, dtype=DTYPES[args.dtype])


def make_variant(name: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """The model of one variant in train mode and AdamW over its trainable parameters (None if none)."""
    model = build_model(args)
    if name == FROZEN:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.requires_grad_())
    elif name == OUR_LORA:
        apply_rasa(model, RaSAConfig(r=RANK, k=0, alpha=ALPHA))
    elif name in (PEFT_LORA, PEFT_LORA_BF16, PEFT_LORA_39):
        from peft import LoraConfig, get_peft_model

        rank = RaSAConfig(r=RANK, k=SHARED_RANK).effective_rank(32) if name == PEFT_LORA_39 else RANK
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=ALPHA, target_modules=list(LLAMA_LINEARS),
                                                 lora_dropout=args.dropout),
                               autocast_adapter_dtype=name == PEFT_LORA)
    elif name in (RASA, RASA_FALLBACK, RASA_REFERENCE):
        apply_rasa(model, RaSAConfig(r=RANK, k=SHARED_RANK, alpha=ALPHA, dropout=args.dropout))
    elif name == RASA_SPLIT:
        apply_rasa(model, RaSAConfig(r=RANK, k=SHARED_RANK, alpha=ALPHA))
        for module in model.modules():
            if isinstance(module, RaSALinear):
                module.__class__ = SplitRaSALinear
    elif name == LORA_EFFECTIVE:
        effective_rank = RaSAConfig(r=RANK, k=SHARED_RANK).effective_rank(args.layers)
        apply_rasa(model, RaSAConfig(r=effective_rank, k=0, alpha=ALPHA))
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {list(ALL_VARIANTS)}")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    return model, optimizer


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: torch.Tensor,
               env: dict | None = None) -> None:
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine_conditions() -> dict:
    return {"cpu_count": len(os.sched_getaffinity(0)), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "platform": platform.platform()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smollm2",
                        help="model shape and batch (the flags below override single values)")
    for flag, help_text in (("layers", None), ("hidden", None), ("intermediate", None), ("heads", None),
                            ("kv-heads", None), ("vocab", None), ("batch", "sequences per step"),
                            ("seq", "tokens per sequence")):
        parser.add_argument(f"--{flag}", type=int, default=None, help=help_text)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model (and activation) dtype")
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (RaSA and PEFT)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: all cores this process may use)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=ALL_VARIANTS,
                        metavar="NAME", help=f"subset to run, from {list(ALL_VARIANTS)}")
    parser.add_argument("--out", default="runs/bench/step_time.json")
    args = parser.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device.split(":")[0] not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    for flag in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "batch", "seq", "steps", "threads"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if FROZEN not in args.variants:
        parser.error(f"--variants must include {FROZEN!r} (the ratios are relative to it)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    conditions_before = machine_conditions()
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = batch.to(args.device)
    variants = {name: make_variant(name, args) for name in args.variants}
    names = list(variants)
    times = {name: [] for name in names}
    peak_step_bytes = {name: 0 for name in names}
    cuda = torch.device(args.device).type == "cuda"
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            model, optimizer = variants[name]
            synchronize(args.device)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            start = time.perf_counter()
            train_step(model, optimizer, batch, VARIANT_ENV.get(name))
            synchronize(args.device)
            elapsed = time.perf_counter() - start
            if cuda:
                peak_step_bytes[name] = max(peak_step_bytes[name], torch.cuda.max_memory_allocated() - resident)
            if round_index >= args.warmup:
                times[name].append(elapsed)
        print(f"round {round_index + 1}/{args.warmup + args.steps} done", file=sys.stderr, flush=True)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base = median[FROZEN]
    result = {
        "config": vars(args),
        "threads": torch.get_num_threads(),
        "machine_before": conditions_before,
        "machine_after": machine_conditions(),
        "median_ms": {name: 1e3 * t for name, t in median.items()},
        "min_ms": {name: 1e3 * min(ts) for name, ts in times.items()},
        "step_ms": {name: [1e3 * t for t in ts] for name, ts in times.items()},
        "ratio_to_frozen_base": {name: t / base for name, t in median.items()},
        "kernels": {"extension": load_extension(), "cpu": has_kernel("cpu"),
                    "cuda": torch.cuda.is_available() and has_kernel("cuda")},
    }
    if cuda:  # working memory of a step (activations, gradients, optimizer state) above the resident models
        result["peak_step_gib"] = {name: b / 2 ** 30 for name, b in peak_step_bytes.items()}
        result["peak_step_over_frozen_gib"] = {name: (b - peak_step_bytes[FROZEN]) / 2 ** 30
                                               for name, b in peak_step_bytes.items()}
    if RASA in median and OUR_LORA in median:
        result["rasa_over_our_lora"] = median[RASA] / median[OUR_LORA]
    if RASA in median and PEFT_LORA in median:
        result["rasa_over_peft_lora"] = median[RASA] / median[PEFT_LORA]
    print(f"{args.batch} x {args.seq} tokens, {args.layers} layers, hidden {args.hidden}, {result['threads']} threads, "
          f"load average {conditions_before['load_average'][0]:.2f} -> {result['machine_after']['load_average'][0]:.2f}")
    print("| variant | median step (ms) | min (ms) | / frozen base | step memory over frozen (GiB) |\n|---|---|---|---|---|")
    for name in names:
        memory = f"{result['peak_step_over_frozen_gib'][name]:+.2f}" if cuda else "-"
        print(f"| {name} | {1e3 * median[name]:.1f} | {result['min_ms'][name]:.1f} | {median[name] / base:.3f} | {memory} |")
    if "rasa_over_our_lora" in result:
        print(f"\nRaSA / our LoRA = {result['rasa_over_our_lora']:.3f} (goal <= 1.10)")
    if RASA in median and PEFT_LORA_BF16 in median:
        result["rasa_over_peft_lora_bf16"] = median[RASA] / median[PEFT_LORA_BF16]
    if RASA in median and RASA_REFERENCE in median:
        result["fused_over_reference"] = median[RASA] / median[RASA_REFERENCE]
    for key in ("rasa_over_peft_lora", "rasa_over_peft_lora_bf16", "fused_over_reference"):
        if key in result:
            print(f"{key} = {result[key]:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
