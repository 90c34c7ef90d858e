"""``tools/reproduce.py``: the RaSA-vs-LoRA-vs-full reproduction on SmolLM2-135M-Instruct (CPU).

    python tools/reproduce.py --out runs/reproduce            # the full setting (README's table)
    python tools/reproduce.py --out /tmp/r --quick            # minutes: 2 ks, 2 seeds, 2 steps
    rasa-reproduce --out runs/reproduce                       # the same, installed

Finished runs under ``<out>/runs/`` are kept, so an interrupted study resumes where it stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from ..eval.reproduce import QUICK, ReproduceOptions, run_study


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rasa-reproduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (CSV, plots, report.md, runs/)")
    parser.add_argument("--quick", action="store_true", help="the test suite's small setting")
    parser.add_argument("--ks", type=int, nargs="+", help="RaSA shared ranks (default 0 1 2 4 8)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--eval-steps", type=int, nargs="+")
    parser.add_argument("--eval-size", type=int)
    parser.add_argument("--no-lora", action="store_true")
    parser.add_argument("--no-full", action="store_true")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = dict(QUICK) if args.quick else {}
    for name in ("ks", "seeds", "steps", "batch_size", "eval_steps", "eval_size"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    settings["with_lora"], settings["with_full"] = not args.no_lora, not args.no_full
    try:
        options = ReproduceOptions(**settings)
        options.check()
        if args.threads is not None and args.threads <= 0:
            raise ValueError(f"--threads must be positive, got {args.threads}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} exists and is not a directory")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(asdict(options)), flush=True)
    try:
        summary = run_study(args.out, options, progress=not args.no_progress)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}/report.md ({summary['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
