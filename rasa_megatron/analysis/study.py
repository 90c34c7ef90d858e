"""The §3 study on a set of weight updates: LoRA's minimum error and RaSA's coordinate descent per
module type and per ``k``, written as ``errors.csv``, Fig. 2 (error vs iteration), Fig. 3 (converged
error / e_lora vs k) and ``summary.json``."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .reconstruction import lora_reconstruction_error, rasa_coordinate_descent


@dataclass
class StudyOptions:
    """``r``: rank budget per layer; ``k``: shared ranks of Fig. 2 (``iterations`` of coordinate
    descent); ``k_sweep``: the k values of Fig. 3 (``sweep_iterations`` each); ``init``: "svd" (from
    Theorem 3.1) or "random" (``seed``)."""
    r: int
    k: int
    k_sweep: list[int]
    iterations: int
    sweep_iterations: int
    init: str = "svd"
    seed: int = 0


def ratio(error: float, e_lora: float) -> float:
    """``error / e_lora`` (NaN when ``e_lora`` is 0: LoRA is already exact)."""
    return error / e_lora if e_lora > 0 else math.nan


def analyse(updates: dict[str, list[torch.Tensor]], options: StudyOptions) -> dict[str, dict]:
    """``{module: {"shape", "num_layers", "e_lora", "curves": {k: errors per iteration}}}``."""
    ks = sorted(set(options.k_sweep) | {options.k})
    results = {}
    with tqdm(total=len(updates) * len(ks), desc="coordinate descent", unit="run") as progress:
        for module, matrices in updates.items():
            e_lora = lora_reconstruction_error(matrices, options.r)
            curves = {}
            for k in ks:
                progress.set_postfix_str(f"{module} k={k}")
                iterations = options.iterations if k == options.k else options.sweep_iterations
                curves[k], _ = rasa_coordinate_descent(matrices, options.r, k, iterations, init=options.init,
                                                       seed=options.seed)
                progress.update()
            results[module] = {"shape": list(matrices[0].shape), "num_layers": len(matrices), "e_lora": e_lora,
                               "curves": curves}
    return results


def write_csv(results: dict[str, dict], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["module", "k", "iteration", "error", "e_lora"])
        for module, result in results.items():
            for k, errors in result["curves"].items():
                writer.writerows((module, k, iteration, error, result["e_lora"]) for iteration, error in enumerate(errors))


def plot_error_vs_iteration(results: dict[str, dict], options: StudyOptions, path: Path) -> None:
    """Fig. 2: RaSA's error during coordinate descent per module type, with LoRA's minimum."""
    import matplotlib.pyplot as plt

    columns = min(4, len(results))
    rows = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(4 * columns, 6), 3.2 * rows + 0.4), squeeze=False)
    for ax, (module, result) in zip(axes.flat, results.items()):
        errors = result["curves"][options.k]
        ax.plot(range(len(errors)), errors, color="tab:blue", lw=2, label=f"RaSA (r={options.r}, k={options.k})")
        ax.axhline(result["e_lora"], color="tab:orange", ls="--", lw=2, label=f"LoRA (r={options.r}) minimum")
        ax.set_title(module, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("reconstruction error")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Coordinate descent, r={options.r}, k={options.k}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_error_vs_k(results: dict[str, dict], options: StudyOptions, path: Path) -> dict[int, float]:
    """Fig. 3: converged error / e_lora vs k, per module type and averaged; returns the average."""
    import matplotlib.pyplot as plt

    ks = options.k_sweep
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for module, result in results.items():
        ax.plot(ks, [ratio(result["curves"][k][-1], result["e_lora"]) for k in ks], lw=1, alpha=0.45,
                marker=".", label=module if len(results) > 1 else None)
    mean = {k: sum(ratio(result["curves"][k][-1], result["e_lora"]) for result in results.values()) / len(results)
            for k in ks}
    ax.plot(ks, list(mean.values()), color="tab:blue", marker="o", lw=2.5, label="RaSA (mean over modules)")
    ax.axhline(1.0, color="tab:orange", ls="--", lw=2, label="LoRA minimum")
    ax.set_xticks(ks)
    ax.set_xlabel("k (ranks each layer shares)")
    ax.set_ylabel("converged error / e_lora")
    ax.set_title(f"Reconstruction error vs k (r={options.r}, {options.sweep_iterations} iterations)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return mean


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_study(updates: dict[str, list[torch.Tensor]], source: dict, options: StudyOptions, out: Path) -> dict:
    """:func:`analyse`, then ``errors.csv``, both figures and ``summary.json`` under ``out``; returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    results = analyse(updates, options)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "errors.csv")
    plot_error_vs_iteration(results, options, out / "fig2_error_vs_iteration.png")
    mean_ratio = plot_error_vs_k(results, options, out / "fig3_error_vs_k.png")
    summary = {
        "source": source, "r": options.r, "k": options.k, "iterations": options.iterations,
        "sweep_iterations": options.sweep_iterations, "init": options.init,
        "mean_ratio_vs_k": {str(k): _finite_or_none(value) for k, value in mean_ratio.items()},
        "modules": {module: {
            "shape": result["shape"], "num_layers": result["num_layers"], "e_lora": result["e_lora"],
            "e_rasa": result["curves"][options.k][-1],
            "ratio": _finite_or_none(ratio(result["curves"][options.k][-1], result["e_lora"])),
            "error_vs_k": {str(k): result["curves"][k][-1] for k in options.k_sweep},
        } for module, result in results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
