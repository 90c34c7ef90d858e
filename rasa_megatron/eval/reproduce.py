"""The RaSA-vs-LoRA reproduction on SmolLM2-135M-Instruct (``tools/reproduce.py``): RaSA at each k,
PEFT LoRA at the same r and alpha (the same parameter budget) and full fine-tuning, several seeds
each, on the default job's arithmetic task ("learns more": held-out exact match during training) with
an offline forgetting probe ("forgets less": the rise in per-token NLL of text the base model itself
wrote, i.e. text it already fits).

Every run is one JSON file under ``<out>/runs/`` (finished runs are skipped on a rerun); the study
writes ``results.csv`` (one row per run and eval step), ``summary.csv``, ``accuracy_vs_steps.png``,
``learning_vs_forgetting.png`` (the paper's Figure 4 axes) and ``report.md``.
"""
from __future__ import annotations

import copy
import csv
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..tasks.arithmetic import build_dataset, collate_sft, evaluate_exact_match, tokenize_sft
from ..training.loop import sft_train_step
from ..training.methods import prepare_method
from ..training.metrics import count_parameters
from ..training.optim import lr_scheduler, make_torch_optimizer
from .report import write_text

#: general-purpose instructions whose base-model answers are the forgetting probe's text
PROBE_INSTRUCTIONS = [
    "Explain how rain forms.", "Describe a good way to start the morning.", "What is photosynthesis?",
    "Give three tips for writing clear emails.", "Why is the sky blue?", "Describe the city of Paris.",
    "What does a librarian do?", "Explain what a computer program is.", "How do bees make honey?",
    "Write a short note thanking a teacher.", "What causes the seasons on Earth?", "Describe how to make tea.",
    "What is the purpose of a bridge?", "Explain why exercise is healthy.", "What is a volcano?",
    "Describe a walk in a forest.", "How does a bicycle work?", "What is the role of the heart?",
    "Give advice for learning a new language.", "Explain what money is used for.", "What is the moon made of?",
    "Describe the job of a firefighter.", "How do plants drink water?", "Why do people keep pets?",
]


@dataclass
class Variant:
    """One compared method: ``name`` as reported, ``method`` (rasa / lora / full), ``k`` for RaSA."""
    name: str
    method: str
    k: int | None = None


@dataclass
class ReproduceOptions:
    """The study's setting (defaults: the full run whose table is in README)."""
    ks: list[int] = field(default_factory=lambda: [0, 1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    with_lora: bool = True
    with_full: bool = True
    r: int = 8
    alpha: float = 16.0
    steps: int = 16
    batch_size: int = 8
    eval_steps: list[int] = field(default_factory=lambda: [8, 16])
    eval_size: int = 40
    eval_batch_size: int = 40
    max_new_tokens: int = 72
    adapter_lr: float = 1e-3
    full_lr: float = 2e-5
    warmup_ratio: float = 0.1
    probe_prompts: int = 24
    probe_tokens: int = 48

    def variants(self) -> list[Variant]:
        found = [Variant(f"rasa_k{k}", "rasa", k) for k in self.ks]
        found += [Variant("lora", "lora")] if self.with_lora else []
        return found + ([Variant("full", "full")] if self.with_full else [])

    def check(self) -> None:
        for name in ("steps", "batch_size", "eval_size", "eval_batch_size", "max_new_tokens", "probe_prompts",
                     "probe_tokens", "r"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        bad = [s for s in self.eval_steps if not 0 < s <= self.steps]
        if bad or not self.eval_steps:
            raise ValueError(f"eval_steps must be non-empty and within 1..steps={self.steps}, got {self.eval_steps}")
        bad_k = [k for k in self.ks if not 0 <= k <= self.r]
        if bad_k:
            raise ValueError(f"ks must lie in 0..r={self.r}, got {bad_k}")
        if self.probe_prompts > len(PROBE_INSTRUCTIONS):
            raise ValueError(f"probe_prompts must be <= {len(PROBE_INSTRUCTIONS)}, got {self.probe_prompts}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        for name in ("ks", "seeds", "eval_steps"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} must not repeat a value, got {values}")


QUICK = dict(ks=[0, 1], seeds=[0, 1], steps=2, batch_size=2, eval_steps=[1, 2], eval_size=4, eval_batch_size=4,
             max_new_tokens=16, probe_prompts=4, probe_tokens=12)


def _chat_prompt(tokenizer, instruction: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                             add_generation_prompt=True)
    return instruction + "\n"


@torch.no_grad()
def build_probe(model, tokenizer, options: ReproduceOptions) -> list[dict]:
    """``[{prompt_ids, text_ids}]``: the base model's greedy answers to :data:`PROBE_INSTRUCTIONS`."""
    probe = []
    for instruction in PROBE_INSTRUCTIONS[:options.probe_prompts]:
        prompt_ids = tokenizer(_chat_prompt(tokenizer, instruction), add_special_tokens=False,
                               return_tensors="pt")["input_ids"]
        output = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
                                max_new_tokens=options.probe_tokens,
                                pad_token_id=tokenizer.pad_token_id)
        probe.append({"prompt_ids": prompt_ids[0].tolist(), "text_ids": output[0, prompt_ids.shape[1]:].tolist()})
    return probe


@torch.no_grad()
def probe_nll(model, probe: list[dict]) -> float:
    """Mean per-token negative log-likelihood of the probe texts given their prompts."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for item in probe:
            ids = torch.tensor([item["prompt_ids"] + item["text_ids"]])
            logits = model(input_ids=ids).logits.float()
            start = len(item["prompt_ids"])
            logprobs = torch.log_softmax(logits[0, start - 1:-1], dim=-1)
            targets = ids[0, start:]
            total -= logprobs.gather(1, targets[:, None]).sum().item()
            count += targets.numel()
    finally:
        model.train(was_training)
    return total / count


def run_variant(base_model, tokenizer, variant: Variant, seed: int, options: ReproduceOptions, probe: list[dict],
                base_probe_nll: float, progress: bool = True) -> dict:
    """Train one variant from a copy of the base model; returns its record (evals at ``eval_steps``)."""
    torch.manual_seed(seed)
    data = build_dataset(options.steps * options.batch_size, options.eval_size, seed=seed)
    features = [tokenize_sft(example, tokenizer) for example in data["train"]]
    model = prepare_method(copy.deepcopy(base_model), variant.method, r=options.r, alpha=options.alpha, k=variant.k)
    trainable, total = count_parameters(model)
    lr = options.full_lr if variant.method == "full" else options.adapter_lr
    optimizer = make_torch_optimizer("lion", [p for p in model.parameters() if p.requires_grad], lr, (0.9, 0.95), 0.0)
    scheduler = lr_scheduler(optimizer, options.steps, options.warmup_ratio)
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    evals, losses, start = [], [], time.perf_counter()
    model.train()
    bar = tqdm(range(1, options.steps + 1), desc=f"{variant.name} seed {seed}", disable=not progress)
    for step in bar:
        indices = order[(step - 1) * options.batch_size:step * options.batch_size]
        losses.append(sft_train_step(model, collate_sft([features[i] for i in indices], tokenizer.pad_token_id),
                                     optimizer, scheduler))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step in options.eval_steps:
            accuracy, _ = evaluate_exact_match(model, tokenizer, data["test"], options.eval_batch_size,
                                               options.max_new_tokens, progress=False)
            nll = probe_nll(model, probe)
            evals.append({"step": step, "accuracy": accuracy, "probe_nll": nll, "forgetting": nll - base_probe_nll})
            bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{accuracy:.3f}")
    return {"variant": variant.name, "method": variant.method, "k": variant.k, "seed": seed, "r": options.r,
            "trainable_parameters": trainable, "total_parameters": total, "lr": lr, "losses": losses,
            "evals": evals, "eval_size": options.eval_size, "seconds": time.perf_counter() - start}


def run_study(out_dir: str | os.PathLike, options: ReproduceOptions, progress: bool = True) -> dict:
    """Every (variant, seed) run not yet on disk, then the CSVs, plots and report; returns the summary."""
    from ..models import load_smollm2

    options.check()
    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    setting = asdict(options)
    setting_path = out / "setting.json"
    if setting_path.exists() and json.loads(setting_path.read_text()) != setting:
        raise ValueError(f"{out} holds runs of another setting ({setting_path}); use a new --out directory")
    write_text(setting_path, json.dumps(setting, indent=2))
    started = time.perf_counter()
    base_model, tokenizer = load_smollm2(torch.float32)
    base_model.requires_grad_(False)
    probe = build_probe(base_model, tokenizer, options)
    base_nll = probe_nll(base_model, probe)
    base_accuracy = {}
    for seed in options.seeds:
        test = build_dataset(options.steps * options.batch_size, options.eval_size, seed=seed)["test"]
        base_accuracy[seed], _ = evaluate_exact_match(base_model, tokenizer, test, options.eval_batch_size,
                                                      options.max_new_tokens, progress=False)
    records = []
    for variant in options.variants():
        for seed in options.seeds:
            path = out / "runs" / f"{variant.name}_seed{seed}.json"
            if path.exists():
                records.append(json.loads(path.read_text()))
                continue
            record = run_variant(base_model, tokenizer, variant, seed, options, probe, base_nll, progress)
            record["base_accuracy"], record["base_probe_nll"] = base_accuracy[seed], base_nll
            write_text(path, json.dumps(record, indent=2))
            records.append(record)
    summary = summarise(records, options)
    summary["wall_seconds"] = time.perf_counter() - started
    write_outputs(out, records, summary, options)
    return summary


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(records: list[dict], options: ReproduceOptions) -> dict:
    """Per variant: final accuracy and forgetting (mean, std over seeds), and per-seed paired
    differences against LoRA (same seed = same data and order)."""
    final = {v.name: {} for v in options.variants()}
    for record in records:
        last = record["evals"][-1]
        final[record["variant"]][record["seed"]] = (last["accuracy"], last["forgetting"], record)
    rows = []
    lora = final.get("lora", {})
    for name, by_seed in final.items():
        seeds = sorted(by_seed)
        accuracy = _mean_std([by_seed[s][0] for s in seeds])
        forgetting = _mean_std([by_seed[s][1] for s in seeds])
        row = {"variant": name, "seeds": len(seeds), "accuracy_mean": accuracy[0], "accuracy_std": accuracy[1],
               "forgetting_mean": forgetting[0], "forgetting_std": forgetting[1],
               "trainable_parameters": by_seed[seeds[0]][2]["trainable_parameters"]}
        paired = [s for s in seeds if s in lora]
        if name != "lora" and paired:
            row["accuracy_minus_lora"] = [by_seed[s][0] - lora[s][0] for s in paired]
            row["forgetting_minus_lora"] = [by_seed[s][1] - lora[s][1] for s in paired]
        rows.append(row)
    return {"rows": rows, "eval_size": options.eval_size, "steps": options.steps}


def verdict(row: dict) -> str:
    """Plain words on one variant against LoRA: better only when every paired seed says so."""
    if "accuracy_minus_lora" not in row:
        return ""
    acc, forget = row["accuracy_minus_lora"], row["forgetting_minus_lora"]
    mean_acc, mean_forget = statistics.fmean(acc), statistics.fmean(forget)
    if min(acc) > 0:
        learn = "learns more than LoRA on every seed"
    elif max(acc) < 0:
        learn = "does not beat LoRA on accuracy (worse on every seed)"
    elif min(acc) == max(acc) == 0:
        learn = "does not beat LoRA on accuracy (tied on every seed)"
    else:
        learn = f"does not beat LoRA on accuracy (mixed across seeds, mean {mean_acc:+.3f})"
    if max(forget) < 0:
        keep = "forgets less than LoRA on every seed"
    elif min(forget) > 0:
        keep = "does not forget less than LoRA (forgets more on every seed)"
    else:
        keep = f"does not forget less than LoRA on every seed (mixed, mean {mean_forget:+.4f})"
    return f"{learn}; {keep}"


def write_outputs(out: Path, records: list[dict], summary: dict, options: ReproduceOptions) -> None:
    """results.csv, summary.csv, the two plots and report.md."""
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "method", "k", "seed", "step", "accuracy", "probe_nll", "forgetting",
                     "train_loss", "trainable_parameters", "eval_size"])
    for record in records:
        for e in [{"step": 0, "accuracy": record["base_accuracy"], "probe_nll": record["base_probe_nll"],
                   "forgetting": 0.0}] + record["evals"]:
            loss = record["losses"][e["step"] - 1] if e["step"] else ""
            writer.writerow([record["variant"], record["method"], record["k"], record["seed"], e["step"],
                             e["accuracy"], e["probe_nll"], e["forgetting"], loss, record["trainable_parameters"],
                             record["eval_size"]])
    write_text(out / "results.csv", buffer.getvalue())
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["variant", "seeds", "accuracy_mean", "accuracy_std", "forgetting_mean", "forgetting_std",
                     "trainable_parameters"])
    for row in summary["rows"]:
        writer.writerow([row[c] for c in ("variant", "seeds", "accuracy_mean", "accuracy_std", "forgetting_mean",
                                          "forgetting_std", "trainable_parameters")])
    write_text(out / "summary.csv", buffer.getvalue())
    _plots(out, records, summary, options)
    write_text(out / "report.md", report_markdown(summary, options))


def report_markdown(summary: dict, options: ReproduceOptions) -> str:
    """The report's table (mean ± std over seeds) and one plain-words line per variant against LoRA."""
    lines = [f"# RaSA vs LoRA vs full fine-tuning: SmolLM2-135M-Instruct, arithmetic ({options.steps} steps of "
             f"{options.batch_size}, r={options.r}, alpha={options.alpha:g}, seeds {options.seeds})", "",
             f"Accuracy: greedy exact match on {options.eval_size} held-out problems per seed (one problem = "
             f"{1 / options.eval_size:.3f}). Forgetting: rise in per-token NLL (nats) of {options.probe_prompts} "
             f"texts the base model wrote itself ({options.probe_tokens} tokens each); lower is less forgetting.", "",
             "| variant | trainable params | accuracy (mean ± std) | forgetting (mean ± std) | vs LoRA per seed "
             "(accuracy; forgetting) |", "|---|---|---|---|---|"]
    for row in summary["rows"]:
        paired = ""
        if "accuracy_minus_lora" in row:
            paired = ", ".join(f"{a:+.3f}" for a in row["accuracy_minus_lora"]) + "; " + ", ".join(
                f"{f:+.3f}" for f in row["forgetting_minus_lora"])
        lines.append(f"| {row['variant']} | {row['trainable_parameters']:,} | {row['accuracy_mean']:.3f} ± "
                     f"{row['accuracy_std']:.3f} | {row['forgetting_mean']:.4f} ± {row['forgetting_std']:.4f} | "
                     f"{paired} |")
    lines += ["", "## Against LoRA, in plain words", ""]
    lines += [f"- {row['variant']}: {verdict(row)}" for row in summary["rows"] if verdict(row)]
    lines += ["", "A variant counts as better only when it is better on every paired seed; at this scale "
                  "(135M parameters, a few hundred examples, CPU) the paper's effect sizes on 7-8B models "
                  "after 8 epochs are not expected."]
    return "\n".join(lines) + "\n"


def _plots(out: Path, records: list[dict], summary: dict, options: ReproduceOptions) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for variant in options.variants():
        runs = [r for r in records if r["variant"] == variant.name]
        steps = [0] + [e["step"] for e in runs[0]["evals"]]
        curves = [[r["base_accuracy"]] + [e["accuracy"] for e in r["evals"]] for r in runs]
        means = [statistics.fmean(c[i] for c in curves) for i in range(len(steps))]
        spreads = [statistics.stdev([c[i] for c in curves]) if len(curves) > 1 else 0.0 for i in range(len(steps))]
        axis.errorbar(steps, means, yerr=spreads, marker="o", capsize=3, label=variant.name)
    axis.set(xlabel="optimizer step", ylabel="held-out exact match", title="Accuracy vs steps (mean ± std over seeds)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "accuracy_vs_steps.png", dpi=120)
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 4))
    for row in summary["rows"]:
        axis.errorbar(row["forgetting_mean"], row["accuracy_mean"], xerr=row["forgetting_std"],
                      yerr=row["accuracy_std"], marker="o", capsize=3, label=row["variant"])
    axis.set(xlabel="forgetting: probe NLL rise (nats/token, lower is better)", ylabel="held-out exact match",
             title="Learning vs forgetting (paper Fig. 4 axes)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "learning_vs_forgetting.png", dpi=120)
    plt.close(figure)


def quick_options() -> ReproduceOptions:
    """The CPU-minutes setting the test suite runs end to end (2 ks, 2 seeds, 2 steps)."""
    return ReproduceOptions(**QUICK)


__all__ = ["ReproduceOptions", "Variant", "run_study", "quick_options", "build_probe", "probe_nll", "summarise",
           "verdict"]
