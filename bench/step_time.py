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
    PEFT LoRA r=8                    peft.LoraConfig(r=8, lora_alpha=16) on the 7 linears
    RaSA r=8 k=1                     apply_rasa(RaSAConfig(r=8, k=1)): private rank 7 + pool of 30
    RaSA r=8 k=1, split GEMMs        no factor copy: one GEMM chain for the private ranks and one for
                                     the pool, summed (the library concatenates the small factors,
                                     [A_i; A_S] and [B_i | B_S], and runs one rank-(r-k+Lk) chain)
    LoRA at RaSA's effective rank    (opt-in, --variants) ours with k=0 and r = r-k+Lk

The variants run round-robin, one step of each per round, starting one variant later every round,
so machine noise (other processes on the box) hits them alike; after --warmup rounds the median of
--steps timed rounds is reported, with the ratio to the frozen base and RaSA / our LoRA.

    python bench/step_time.py                     # SmolLM2-135M shape, 8 x 96 tokens
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

FROZEN = "frozen base"
OUR_LORA = "LoRA r=8 (ours, k=0)"
PEFT_LORA = "PEFT LoRA r=8"
RASA = "RaSA r=8 k=1"
RASA_SPLIT = "RaSA r=8 k=1, split GEMMs (no factor copy)"
LORA_EFFECTIVE = "LoRA at RaSA's effective rank"
DEFAULT_VARIANTS = (FROZEN, OUR_LORA, PEFT_LORA, RASA, RASA_SPLIT)
ALL_VARIANTS = DEFAULT_VARIANTS + (LORA_EFFECTIVE,)
RANK, SHARED_RANK, ALPHA = 8, 1, 16


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
    return LlamaForCausalLM(config)


def make_variant(name: str, args) -> tuple[torch.nn.Module, torch.optim.Optimizer | None]:
    """The model of one variant in train mode and AdamW over its trainable parameters (None if none)."""
    model = build_model(args)
    if name == FROZEN:
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _module, _inputs, out: out.requires_grad_())
    elif name == OUR_LORA:
        apply_rasa(model, RaSAConfig(r=RANK, k=0, alpha=ALPHA))
    elif name == PEFT_LORA:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(LLAMA_LINEARS)))
    elif name == RASA:
        apply_rasa(model, RaSAConfig(r=RANK, k=SHARED_RANK, alpha=ALPHA))
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


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, batch: torch.Tensor) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def machine_conditions() -> dict:
    return {"cpu_count": len(os.sched_getaffinity(0)), "load_average": list(os.getloadavg()),
            "torch": torch.__version__, "platform": platform.platform()}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq", type=int, default=96, help="tokens per sequence")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first")
    parser.add_argument("--steps", type=int, default=10, help="timed rounds")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: all cores this process may use)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=ALL_VARIANTS,
                        metavar="NAME", help=f"subset to run, from {list(ALL_VARIANTS)}")
    parser.add_argument("--out", default="runs/bench/step_time.json")
    args = parser.parse_args(argv)
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
    variants = {name: make_variant(name, args) for name in args.variants}
    names = list(variants)
    times = {name: [] for name in names}
    for round_index in range(args.warmup + args.steps):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            model, optimizer = variants[name]
            start = time.perf_counter()
            train_step(model, optimizer, batch)
            elapsed = time.perf_counter() - start
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
    }
    if RASA in median and OUR_LORA in median:
        result["rasa_over_our_lora"] = median[RASA] / median[OUR_LORA]
    if RASA in median and PEFT_LORA in median:
        result["rasa_over_peft_lora"] = median[RASA] / median[PEFT_LORA]
    print(f"{args.batch} x {args.seq} tokens, {args.layers} layers, hidden {args.hidden}, {result['threads']} threads, "
          f"load average {conditions_before['load_average'][0]:.2f} -> {result['machine_after']['load_average'][0]:.2f}")
    print("| variant | median step (ms) | min (ms) | / frozen base |\n|---|---|---|---|")
    for name in names:
        print(f"| {name} | {1e3 * median[name]:.0f} | {result['min_ms'][name]:.0f} | {median[name] / base:.3f} |")
    if "rasa_over_our_lora" in result:
        print(f"\nRaSA / our LoRA = {result['rasa_over_our_lora']:.3f} (goal <= 1.10)")
    if "rasa_over_peft_lora" in result:
        print(f"RaSA / PEFT LoRA = {result['rasa_over_peft_lora']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
