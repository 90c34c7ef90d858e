"""HumanEval(+) scoring: every canonical solution passes and wrong ones fail, pass@k equals its closed
form, an EvalPlus-schema file is differentially tested (a solution that only fits the base tests
fails HumanEval+), and generation -> sandbox -> report runs end to end on a tiny model."""
import json
from math import comb

import pytest

from rasa_megatron.eval.code import (
    default_problems_path,
    evaluate_code,
    format_code_prompt,
    load_humaneval,
    pass_at_k,
    program_for,
    score_completions,
)
from rasa_megatron.eval.sandbox import OPT_IN_VARIABLE, CodeExecutionRefused, SandboxLimits


@pytest.fixture
def opted_in(monkeypatch):
    monkeypatch.setenv(OPT_IN_VARIABLE, "1")


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


def test_all_164_canonical_solutions_pass_and_wrong_ones_fail(problems, opted_in):
    assert len(problems) == 164
    completions = [[p["canonical_solution"], "    return None\n"] for p in problems]
    scores, records = score_completions(problems, completions, default_problems_path(), ks=(1,), workers=2,
                                        progress=False)
    canonical = [r for r in records if r["sample"] == 0]
    assert [r["task_id"] for r in canonical if r["humaneval"]["status"] != "passed"] == []
    wrong_passed = [r["task_id"] for r in records if r["sample"] == 1 and r["humaneval"]["status"] == "passed"]
    assert wrong_passed == []
    (entry,) = scores
    assert entry["benchmark"] == "humaneval" and entry["metric"] == "pass@1" and entry["n"] == 164
    assert entry["value"] == pytest.approx(0.5) and len(entry["data_sha256"]) == 64 and not entry["fixture"]


def test_a_subtly_wrong_solution_fails(problems, opted_in):
    first = problems[0]  # has_close_elements
    off_by_one = ("    for i in range(len(numbers)):\n        for j in range(i + 1, len(numbers) - 1):\n"
                  "            if abs(numbers[i] - numbers[j]) < threshold:\n                return True\n"
                  "    return False\n")
    _, records = score_completions([first], [[first["canonical_solution"], off_by_one]], default_problems_path(), ks=(1,),
                                   progress=False)
    assert [r["humaneval"]["status"] for r in records] == ["passed", "failed"]
    assert "AssertionError" in records[1]["humaneval"]["stderr_tail"]


def _closed_form(n, c, k):
    return 1.0 - comb(n - c, k) / comb(n, k)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (10, 3, 1), (10, 3, 2), (10, 3, 5), (50, 1, 10),
                                   (50, 49, 10), (50, 0, 10), (20, 20, 10), (7, 2, 6)])
def test_pass_at_k_matches_the_closed_form(n, c, k):
    assert pass_at_k([n], [c], k) == pytest.approx(_closed_form(n, c, k), abs=1e-12)


def test_pass_at_k_means_over_problems_and_checks_k():
    assert pass_at_k([10, 10], [3, 0], 1) == pytest.approx((0.3 + 0.0) / 2)
    assert pass_at_k([5, 5], [5, 1], 2) == pytest.approx((1.0 + 0.4) / 2)
    with pytest.raises(ValueError, match="pass@5 needs >= 5 samples per problem, got 3"):
        pass_at_k([3], [1], 5)


def _plus_record(problems, task_id, base_input, plus_input, atol=0):
    problem = next(p for p in problems if p["task_id"] == task_id)
    return {**problem, "base_input": base_input, "plus_input": plus_input, "atol": atol}


def test_evalplus_schema_file_is_differentially_tested(problems, opted_in, tmp_path):
    """HumanEval/0 with extra inputs where a '<=' instead of '<' breaks (no base test has a gap equal to
    the threshold), and
    HumanEval/4 (floats) where a reordered sum must still pass within atol."""
    records = [
        _plus_record(problems, "HumanEval/0", [[[1.0, 2.0, 3.0], 0.5], [[1.0, 2.8, 3.0, 4.0, 5.0, 2.0], 0.3]],
                     [[[1.0, 2.0], 1.0], [[3.0, 1.0], 2.5], [[], 1.0]]),
        _plus_record(problems, "HumanEval/4", [[[1.0, 2.0, 3.0, 4.0]]], [[[0.1, 0.2, 0.7, 1e-9, 3.3]]], atol=1e-9),
    ]
    path = tmp_path / "HumanEvalPlus-fixture.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_humaneval(path)
    base_only = loaded[0]["canonical_solution"].replace("< threshold", "<= threshold")
    assert base_only != loaded[0]["canonical_solution"]
    reordered = ("    mean = sum(reversed(numbers)) / len(numbers)\n"
                 "    return sum(abs(mean - x) for x in reversed(numbers)) / len(numbers)\n")
    completions = [[loaded[0]["canonical_solution"], base_only], [loaded[1]["canonical_solution"], reordered]]
    scores, out = score_completions(loaded, completions, path, ks=(1, 2), progress=False, fixture=True)
    status = {(r["task_id"], r["sample"]): (r["humaneval"]["status"], r["humaneval_plus"]["status"]) for r in out}
    assert status == {("HumanEval/0", 0): ("passed", "passed"), ("HumanEval/0", 1): ("passed", "failed"),
                      ("HumanEval/4", 0): ("passed", "passed"), ("HumanEval/4", 1): ("passed", "passed")}
    values = {(s["benchmark"], s["metric"]): s["value"] for s in scores}
    assert values == {("humaneval", "pass@1"): 1.0, ("humaneval", "pass@2"): 1.0,
                      ("humaneval_plus", "pass@1"): pytest.approx(0.75), ("humaneval_plus", "pass@2"): 1.0}
    assert all(s["fixture"] and s["n"] == 2 for s in scores)


def test_bad_problem_file_names_what_is_missing(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"task_id": "X/1", "prompt": "def f():\n", "entry_point": "f"}) + "\n")
    with pytest.raises(ValueError, match=r"X/1 lacks \['test'\].*needs string fields"):
        load_humaneval(path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no problems"):
        load_humaneval(tmp_path / "empty.jsonl")


def test_prompt_is_the_papers_template(problems):
    prompt = format_code_prompt(problems[0])
    assert prompt.startswith("Below is an instruction that describes a task.")
    assert "### Instruction:\nCreate a Python script for this problem:\n" in prompt
    assert prompt.endswith("### Response:\n" + problems[0]["prompt"])
    assert program_for(problems[0], "    pass\n").endswith("check(has_close_elements)\n")


def test_evaluate_code_refuses_before_generating(monkeypatch):
    monkeypatch.delenv(OPT_IN_VARIABLE, raising=False)
    with pytest.raises(CodeExecutionRefused):
        evaluate_code(model=None, tokenizer=None)


def test_evaluate_code_end_to_end(smollm2_tokenizer, tiny_llama, opted_in):
    model = tiny_llama(smollm2_tokenizer, seed=3)
    scores, records = evaluate_code(model, smollm2_tokenizer, num_samples=3, temperature=0.8, ks=(1, 3),
                                    max_new_tokens=12, batch_size=2, limit=2, limits=SandboxLimits(timeout_s=10),
                                    progress=False)
    assert len(records) == 6 and {r["task_id"] for r in records} == {"HumanEval/0", "HumanEval/1"}
    assert [(s["metric"], s["n"], s["samples_per_problem"]) for s in scores] == [("pass@1", 2, 3), ("pass@3", 2, 3)]
    assert all(0.0 <= s["value"] <= 1.0 and s["temperature"] == 0.8 and s["limit"] == 2 for s in scores)
    with pytest.raises(ValueError, match="1 <= k <= num_samples=3"):
        evaluate_code(model, smollm2_tokenizer, num_samples=3, temperature=0.8, ks=(10,))


@pytest.mark.parametrize("completion", ["    exit()\n", "    import sys; sys.exit(0)\n", "    raise SystemExit\n",
                                        "    import os; os._exit(0)\n", "    quit()\n"])
def test_exiting_early_is_a_failure(problems, opted_in, tmp_path, completion):
    first = problems[0]
    plus = dict(first, base_input=[[[1.0, 2.0, 3.0], 0.5]], plus_input=[[[1.0, 2.0], 1.0]], atol=0)
    path = tmp_path / "plus.jsonl"
    path.write_text(json.dumps(plus) + "\n")
    for problem, data in ((first, default_problems_path()), (plus, path)):
        _, records = score_completions([problem], [[completion]], data, ks=(1,), progress=False)
        suites = [s for s in ("humaneval", "humaneval_plus") if s in records[0]]
        assert [records[0][s]["status"] for s in suites] == ["failed"] * len(suites), records


def test_find_zero_accepts_any_root(problems, opted_in, tmp_path):
    """EvalPlus checks HumanEval/32 by |poly(xs, x)| <= 1e-6; the canonical bisection finds 1.0 for
    (x-1)(x-2)(x-3), this candidate returns 3.0, and a non-root fails."""
    task = dict(next(p for p in problems if p["task_id"] == "HumanEval/32"),
                base_input=[[[-6, 11, -6, 1]]], plus_input=[[[-6, 11, -6, 1]], [[1, 2]]], atol=0)
    path = tmp_path / "find_zero.jsonl"
    path.write_text(json.dumps(task) + "\n")
    other_root = ("    for r in (3.0, 2.0):\n        if abs(poly(xs, r)) < 1e-12:\n            return r\n"
                  + task["canonical_solution"])
    _, records = score_completions([task], [[other_root, "    return 0.25\n"]], path, ks=(1,), progress=False)
    assert [r["humaneval_plus"]["status"] for r in records] == ["passed", "failed"]
