"""The default job: fine-tune SmolLM2-135M-Instruct on generated arithmetic word problems, on CPU.

    bash examples/run_default.sh                     # RaSA r=8 k=1 (the defaults below)
    bash examples/run_default.sh --method lora       # real PEFT LoRA, same r and alpha
    bash examples/run_default.sh --method full --name full   # full fine-tuning (tools/reconstruction.py input)

Writes runs/<name>/{metrics.csv, loss.png, summary.json, eval_before.jsonl, eval_after.jsonl} and the
trained weights (RaSA: adapter/ and its PEFT export peft_adapter/; LoRA: adapter/; full: model/).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rasa_megatron import RaSAConfig, export_peft_lora, save_adapter
from rasa_megatron.models import load_smollm2
from rasa_megatron.tasks.arithmetic import build_dataset, collate_sft, evaluate_exact_match, tokenize_sft
from rasa_megatron.training.loop import sft_train_step
from rasa_megatron.training.methods import METHODS, prepare_method
from rasa_megatron.training.metrics import MetricsLogger, count_parameters
from rasa_megatron.training.optim import make_torch_optimizer

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=METHODS, default="rasa")
    parser.add_argument("--name", default=None, help="run name (default: the method)")
    parser.add_argument("--out", default="runs", help="parent directory of the run directory")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--optimizer", choices=("lion", "adamw"), default="lion")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default 1e-3 for adapters, 2e-5 for full; Lion)")
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95), help="paper: (0.9, 0.95)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--train-size", type=int, default=None,
                        help="training problems (default: steps x batch size, i.e. one epoch)")
    parser.add_argument("--eval-size", type=int, default=64, help="held-out problems for exact match")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="optimizer steps (default 32)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training set instead of --steps")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=72,
                        help="generation cap (the longest worked answer is 68 tokens)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    for name in ("steps", "epochs", "train_size", "batch_size", "eval_size", "eval_batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.epochs is None:
        args.steps = args.steps or 32
        args.train_size = args.train_size or args.steps * args.batch_size
    else:
        args.train_size = args.train_size or 320
        args.steps = math.ceil(args.epochs * args.train_size / args.batch_size)
    if args.lr is None:
        args.lr = 2e-5 if args.method == "full" else 1e-3
    if not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.method == "rasa":
        try:
            args.rasa_config = RaSAConfig(r=args.r, k=args.k, alpha=args.alpha, dropout=args.dropout)
        except ValueError as err:
            parser.error(str(err))
    elif args.r <= 0:
        parser.error(f"--r must be a positive integer, got {args.r}")
    args.name = args.name or args.method
    return args


def prepare_model(model, args):
    """Put the chosen method on the loaded base model; returns the model to train."""
    return prepare_method(model, args.method, r=args.r, alpha=args.alpha, dropout=args.dropout, k=args.k)


def make_optimizer(params, args) -> torch.optim.Optimizer:
    """LionW (decoupled weight decay, lion-pytorch) as in the paper, or AdamW."""
    return make_torch_optimizer(args.optimizer, params, args.lr, args.betas, args.weight_decay)


def save_trained(model, args, run_dir: Path) -> dict:
    if args.method == "rasa":
        save_adapter(model, run_dir / "adapter")
        export_peft_lora(model, run_dir / "peft_adapter")
        return {"adapter": str(run_dir / "adapter"), "peft_adapter": str(run_dir / "peft_adapter")}
    if args.method == "lora":
        model.save_pretrained(run_dir / "adapter")
        return {"adapter": str(run_dir / "adapter")}
    model.save_pretrained(run_dir / "model")
    return {"model": str(run_dir / "model")}


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    run_dir = Path(args.out) / args.name
    run_dir.mkdir(parents=True, exist_ok=True)

    data = build_dataset(args.train_size, args.eval_size, seed=args.seed)
    model, tokenizer = load_smollm2(torch.float32)
    train_features = [tokenize_sft(example, tokenizer) for example in data["train"]]

    accuracy_before, records = evaluate_exact_match(model, tokenizer, data["test"], args.eval_batch_size,
                                                    args.max_new_tokens)
    write_jsonl(run_dir / "eval_before.jsonl", records)
    print(f"held-out exact match before training: {accuracy_before:.3f}", flush=True)

    model = prepare_model(model, args)
    trainable, total = count_parameters(model)
    print(f"method={args.method} trainable parameters: {trainable:,} of {total:,}", flush=True)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], args)
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * args.steps), args.steps)
    logger = MetricsLogger(run_dir)
    order = torch.randperm(len(train_features), generator=torch.Generator().manual_seed(args.seed)).tolist()
    model.train()
    train_start = time.perf_counter()
    progress = tqdm(range(args.steps), desc=f"train {args.method}")
    for step in progress:
        begin = (step * args.batch_size) % len(order)
        indices = [order[(begin + i) % len(order)] for i in range(args.batch_size)]
        batch = collate_sft([train_features[i] for i in indices], tokenizer.pad_token_id)
        lr = scheduler.get_last_lr()[0]
        loss = sft_train_step(model, batch, optimizer, scheduler)
        row = logger.log(step + 1, int(batch["attention_mask"].sum()), loss=loss, lr=lr)
        progress.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                             rss=f"{row['peak_rss_mib']:.0f}MiB")
    train_seconds = time.perf_counter() - train_start
    logger.write_csv()
    logger.plot_loss(title=f"SmolLM2-135M arithmetic, {args.method}")

    accuracy_after, records = evaluate_exact_match(model, tokenizer, data["test"], args.eval_batch_size,
                                                   args.max_new_tokens)
    write_jsonl(run_dir / "eval_after.jsonl", records)
    print(f"held-out exact match after training: {accuracy_after:.3f}", flush=True)
    saved = save_trained(model, args, run_dir)
    summary = {
        "method": args.method,
        "accuracy_before": accuracy_before,
        "accuracy_after": accuracy_after,
        "eval_size": args.eval_size,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "final_loss": logger.rows[-1]["loss"],
        "mean_tokens_per_s": sum(r["tokens"] for r in logger.rows) / train_seconds,
        "peak_rss_mib": logger.rows[-1]["peak_rss_mib"],
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - start,
        "saved": saved,
        "args": {k: v for k, v in vars(args).items() if k != "rasa_config"},
    }
    if args.method == "rasa":
        summary["rasa_config"] = args.rasa_config.to_dict()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: summary[k] for k in ("accuracy_before", "accuracy_after", "trainable_parameters",
                                              "wall_seconds")}), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
