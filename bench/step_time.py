"""CPU training-step time: frozen base vs LoRA vs PEFT LoRA vs RaSA, as ratios measured side by side.

One process, a Llama with SmolLM2-135M's shape and random fp32 weights, one fixed random batch.
A step is forward + loss + backward + AdamW step on the trainable parameters. For the frozen base
(no trainable parameters) the input embeddings' output requires grad, so the step pays the same
activation-gradient backward through every layer that all adapter methods pay, and no optimizer.
Variants run round-robin (one step of each in turn) so machine noise hits them alike; the median
over the timed rounds is reported.

    python bench/step_time.py                     # SmolLM2-135M shape, 8 x 96 tokens
    python bench/step_time.py --layers 2 --hidden 64 --intermediate 128 --vocab 256 --seq 16 --batch 2
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rasa_megatron import LLAMA_LINEARS, RaSAConfig, RaSALinear, apply_rasa  # noqa: E402
from rasa_megatron.functional import lora_factors  # noqa: E402


class ConcatPerCallRaSALinear(RaSALinear):
    """The authors' layout: concatenate [A_i; A_S] and [B_i | B_S] on every forward call."""

    def forward(self, x):
        result = self.base_layer(x)
        lora_A, lora_B = lora_factors(*self._factors())
        return result + (self.dropout(x).to(lora_A.dtype) @ lora_A.T @ lora_B.T).to(result.dtype)


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, tie_word_embeddings=True, max_position_embeddings=2048)
    return LlamaForCausalLM(config)


def make_variant(name: str, args):
    model = build_model(args)
    if name == "frozen base":
        model.requires_grad_(False)
        model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_())
    elif name == "LoRA r=8 (ours, k=0)":
        apply_rasa(model, RaSAConfig(r=8, k=0, alpha=16))
    elif name == "PEFT LoRA r=8":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LLAMA_LINEARS)))
    elif name == "RaSA r=8 k=1":
        apply_rasa(model, RaSAConfig(r=8, k=1, alpha=16))
    elif name == "RaSA r=8 k=1, concat per call":
        apply_rasa(model, RaSAConfig(r=8, k=1, alpha=16))
        for module in model.modules():
            if isinstance(module, RaSALinear):
                module.__class__ = ConcatPerCallRaSALinear
    else:
        raise ValueError(name)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    return model, optimizer


VARIANTS = ("frozen base", "LoRA r=8 (ours, k=0)", "PEFT LoRA r=8", "RaSA r=8 k=1", "RaSA r=8 k=1, concat per call")


def step(model, optimizer, batch) -> None:
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="runs/bench/step_time.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    variants = {name: make_variant(name, args) for name in VARIANTS}
    times = {name: [] for name in VARIANTS}
    for round_index in range(args.warmup + args.steps):
        for name, (model, optimizer) in variants.items():
            start = time.perf_counter()
            step(model, optimizer, batch)
            if round_index >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    base, lora = median["frozen base"], median["LoRA r=8 (ours, k=0)"]
    result = {"config": vars(args), "threads": torch.get_num_threads(),
              "median_ms": {n: 1e3 * t for n, t in median.items()},
              "ratio_to_frozen_base": {n: t / base for n, t in median.items()},
              "rasa_over_our_lora": median["RaSA r=8 k=1"] / lora,
              "rasa_over_peft_lora": median["RaSA r=8 k=1"] / median["PEFT LoRA r=8"]}
    print(f"| variant | median step (ms) | / frozen base |\n|---|---|---|")
    for name in VARIANTS:
        print(f"| {name} | {1e3 * median[name]:.0f} | {median[name] / base:.3f} |")
    print(f"\nRaSA / our LoRA = {result['rasa_over_our_lora']:.3f} (goal <= 1.10); "
          f"RaSA / PEFT LoRA = {result['rasa_over_peft_lora']:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
