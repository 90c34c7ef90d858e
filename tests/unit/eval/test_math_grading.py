"""MATH grading: answer extraction, both graders on equivalent / non-equivalent pairs (and the pairs
where they legitimately differ), time bounds on pathological answers (main thread and the worker process
other threads use), problem loading for the MATH / MATH-500 / arithmetic schemas, per-type and per-level
accuracies, and one end-to-end run with a tiny random Llama over the SmolLM2 tokenizer."""
import json
import signal
import threading
import time

import pytest

from rasa_megatron.eval import math_grading
from rasa_megatron.eval.generation import generate
from rasa_megatron.eval.math_grading import (MATH_STOP, evaluate_math, extract_answer, grade, grade_completions,
                                             load_problems)
from rasa_megatron.eval.report import sha256_of
from rasa_megatron.tasks.arithmetic import format_prompt, generate_problems

# (gold, predicted): both graders must say equivalent.
EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\dfrac12", "1/2"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    ("x^2+2x+1", "(x+1)^2"),
    ("(0,1]", "(0, 1]"),
    (r"\text{(A)}", "A"),
    (r"30^\circ", "30"),
    (r"30^{\circ}", "30"),
    ("1,000", "1000"),
    ("-5", "- 5"),
    ("-3", "-3.0"),
    (r"\pi/2", r"\frac{\pi}{2}"),
    (r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", r"\begin{pmatrix}1 & 2\\3 & 4\end{pmatrix}"),
    (r"\frac{\sqrt{3}}{2}", r"\frac{1}{2}\sqrt{3}"),
    (r"\frac{1}{\sqrt{2}}", r"\frac{\sqrt{2}}{2}"),
    ("0.25", r"\frac14"),
    (r"-\frac{2}{3}", "-2/3"),
    (r"\frac{9}{2}", "4.5"),
    (r"\frac{2}{4}", r"\frac12"),
    ("2", "2.0"),
    ("5", r"5 \text{ cm}"),
    (r"\$5", "5"),
    ("x=3", "3"),
    (r"\infty", r"\infty"),
    ("(1,2)", "(1, 2)"),
    (r"\{1,2\}", r"\{1,2\}"),
    (r"2^{10}", "1024"),
    (r"\text{Monday}", "Monday"),
]

# (gold, predicted): both graders must say not equivalent.
NOT_EQUIVALENT = [
    ("1/2", "1/3"),
    ("x+1", "x-1"),
    ("3", "-3"),
    ("1000", "100"),
    ("12", "13"),
    ("3", "x=4"),
    (r"\sqrt{2}", "2"),
    (r"\frac{\pi}{2}", r"\pi"),
    ("(0,1]", "[0,1]"),
    ("(0,1]", "(0,1)"),
    ("[2,5)", "[2,5]"),
    ("(1,2)", "(2,1)"),
    (r"\{1,2\}", r"\{1,3\}"),
    (r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 5 \end{pmatrix}"),
    (r"10\%", "20"),
    (r"\text{(B)}", "A"),
    (r"\text{Monday}", r"\text{Tuesday}"),
    (r"45^\circ", r"\frac{\pi}{4}"),
    ("0", r"\emptyset"),
]

# (gold, predicted, math_verify, minerva): the graders legitimately differ; the module reports both.
# Each verdict is the library's own documented behaviour, not this module's:
DISAGREEING = [
    # sympy's parse_latex cannot parse a set, and the strings differ, so is_equiv is False;
    # math-verify compares sets as sets.
    (r"\{1,2\}", r"\{2,1\}", True, False),
    # math-verify's normalisation drops \%; Minerva's normalize_final_answer keeps it, and the
    # strings then differ (parse_latex fails on "10\%").
    (r"10\%", "10", True, False),
    ("100", r"100\%", True, False),
    # Minerva's normalisation replaces "\ " (backslash-space) with "", which turns the row break
    # "\\ 2" into "\2" on one side only; math-verify parses both matrices.
    (r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", r"\begin{pmatrix}1\\2\end{pmatrix}", True, False),
    # math-verify compares numbers after rounding to 6 decimals (float_rounding=6); is_equiv needs
    # the sympy difference to simplify to exactly 0.
    (r"\sqrt{2}", "1.41421356", True, False),
    # math-verify reads "x \in [2,5)" as the interval; normalize_final_answer keeps "x\in".
    (r"x \in [2,5)", "[2,5)", True, False),
    # normalize_final_answer strips \text{...} and the unit "cm"; math-verify takes \text{5 cm}
    # as a string that differs from "5".
    ("5", r"\text{5 cm}", False, True),
]

TOWER = "9^{9^{9^{9^{9}}}}"


@pytest.mark.parametrize("gold, predicted", EQUIVALENT)
def test_equivalent_answers_are_correct_for_both_graders(gold, predicted):
    assert grade(predicted, gold) == {"math_verify": True, "minerva": True}


@pytest.mark.parametrize("gold, predicted", NOT_EQUIVALENT)
def test_different_answers_are_wrong_for_both_graders(gold, predicted):
    assert grade(predicted, gold) == {"math_verify": False, "minerva": False}


@pytest.mark.parametrize("gold, predicted, by_math_verify, by_minerva", DISAGREEING)
def test_documented_grader_disagreements(gold, predicted, by_math_verify, by_minerva):
    assert grade(predicted, gold) == {"math_verify": by_math_verify, "minerva": by_minerva}


def test_no_prediction_is_wrong_and_gold_solution_is_a_math_verify_fallback():
    assert grade(None, "3") == {"math_verify": False, "minerva": False}
    # an empty gold parses to nothing for math-verify, which then reads the solution's boxed answer
    solution = r"So the answer is $\boxed{\frac{1}{2}}$."
    assert grade("0.5", "") == {"math_verify": False, "minerva": False}
    assert grade("0.5", "", solution) == {"math_verify": True, "minerva": False}


@pytest.mark.parametrize("completion, expected", [
    ("so x = 4. The answer is: 7", "7"),
    ("We get $\\boxed{12}$. The answer is: 13.", "13"),  # the prefix wins over \boxed
    ("The answer is: 5\nCheck again. The answer is: 6", "6"),  # the last occurrence wins
    ("The answer is: $\\frac{3}{4}$.", "\\frac{3}{4}"),
    ("The answer is: \\boxed{9}", "9"),
    ("The answer is: 8\n\n### Next we", "8"),  # the rest of that line only
    ("Thus $\\boxed{\\frac{\\sqrt{2}}{2}}$ and finally \\boxed{\\{1,\\{2\\}\\}}.", "\\{1,\\{2\\}\\}"),
    ("first \\boxed{1} then \\fbox{2}", "1"),  # lm-eval's last_boxed_only_string prefers \boxed
    ("only a frame: \\fbox{x+1}", "x+1"),
    ("The answer is:", None),
    ("I have no idea.", None),
    ("unclosed \\boxed{3", None),
])
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


def test_pathological_answers_are_time_bounded_and_wrong():
    # A guard against hangs, not a performance test: the tower reaches both graders and is stopped by
    # their own timeouts (math-verify 2 s per comparison, is_equiv 5 s); the others exceed the length cap.
    started = time.monotonic()
    for answer in (TOWER, "(" * 20000 + "1" + ")" * 20000, "7" * 200_000):
        assert grade(answer, "3") == {"math_verify": False, "minerva": False}
    assert time.monotonic() - started < 10
    assert grade("\\boxed{" * 20000 + "}" * 20000, "3") == {"math_verify": False, "minerva": False}


def test_caller_alarm_survives_grading():
    fired = []

    def handler(signum, frame):
        fired.append(signum)

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 100.0)
        assert grade("0.5", r"\frac12") == {"math_verify": True, "minerva": True}
        assert signal.getsignal(signal.SIGALRM) is handler
        assert 90.0 < signal.getitimer(signal.ITIMER_REAL)[0] <= 100.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert not fired


def test_other_threads_grade_in_a_worker_that_is_killed_past_its_deadline(monkeypatch):
    verdicts, durations = {}, {}

    def grade_in_thread():
        verdicts["easy"] = grade("0.5", r"\frac12")
        monkeypatch.setattr(math_grading, "WORKER_DEADLINE_S", 1.0)
        started = time.monotonic()
        verdicts["tower"] = grade(TOWER, "3")  # needs ~2-7 s in the worker: killed after 1 s
        durations["tower"] = time.monotonic() - started
        monkeypatch.setattr(math_grading, "WORKER_DEADLINE_S", 30.0)
        verdicts["after_restart"] = grade(r"\{2,1\}", r"\{1,2\}")

    thread = threading.Thread(target=grade_in_thread)
    thread.start()
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert verdicts["easy"] == {"math_verify": True, "minerva": True}
    assert verdicts["tower"] == {"math_verify": False, "minerva": False}
    assert durations["tower"] < 5
    assert verdicts["after_restart"] == {"math_verify": True, "minerva": False}  # as DISAGREEING[0]


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


MATH_RECORDS = [
    {"problem": "Compute $1+1$.", "solution": "We get $\\boxed{2}$.", "type": "Algebra", "level": "Level 1"},
    {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "type": "Algebra", "level": "Level 2"},
    {"problem": "Cube of 2?", "solution": "$2^3=\\boxed{8}$", "type": "Number Theory", "level": "Level 1"},
    {"problem": "Seven?", "solution": "\\boxed{7}", "type": "Number Theory", "level": "Level 2"},
    {"problem": "Nine?", "solution": "\\boxed{9}", "type": "Number Theory", "level": "Level 2"},
    {"problem": "Interval?", "solution": "\\boxed{(0,1]}", "type": "Algebra", "level": "Level 10"},
]


def test_load_problems_math_and_math500_schemas(tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", MATH_RECORDS[:2] + [
        {"problem": "P", "solution": "so \\boxed{\\dfrac{1}{2}}", "answer": "\\frac{1}{2}", "subject": "Precalculus",
         "level": 3, "unique_id": "test/precalculus/1.json"}])
    problems = load_problems(path)
    assert problems[0] == {"id": "0", "problem": "Compute $1+1$.", "answer": "2", "solution": "We get $\\boxed{2}$.",
                           "type": "Algebra", "level": "1"}
    assert problems[1]["answer"] == "\\frac{1}{2}"
    assert problems[2] == {"id": "test/precalculus/1.json", "problem": "P", "answer": "\\frac{1}{2}",
                           "solution": "so \\boxed{\\dfrac{1}{2}}", "type": "Precalculus", "level": "3"}


def test_load_problems_arithmetic_and_generic_schemas(tmp_path):
    arithmetic = generate_problems(2, seed=5)
    path = _write_jsonl(tmp_path / "arith.jsonl", arithmetic + [{"question": "2+2?", "answer": "4"}])
    problems = load_problems(path)
    assert [p["answer"] for p in problems] == [str(arithmetic[0]["answer"]), str(arithmetic[1]["answer"]), "4"]
    assert problems[0]["problem"] == arithmetic[0]["question"] and problems[0]["solution"] == arithmetic[0]["solution"]
    assert problems[2]["solution"] is None and problems[2]["type"] is None and problems[2]["level"] is None


@pytest.mark.parametrize("bad_record", [{"problem": "P", "solution": "no box here"}, {"answer": "3", "text": "Q"}])
def test_load_problems_bad_line_names_file_line_and_keys(tmp_path, bad_record):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MATH_RECORDS[0]) + "\n\n" + json.dumps(bad_record) + "\n")
    with pytest.raises(ValueError) as error:
        load_problems(path)
    message = str(error.value)
    assert f"{path}:3:" in message  # the blank line 2 is counted
    assert str(sorted(bad_record)) in message and "'problem' or 'question'" in message


def test_grade_completions_per_type_and_level(tmp_path):
    path = _write_jsonl(tmp_path / "math.jsonl", MATH_RECORDS)
    problems = load_problems(path)
    completions = [
        "1+1 is 2. The answer is: 2",  # correct
        "Half is $\\boxed{0.5}$",  # correct
        "The answer is: 9",  # wrong
        "I am not sure.",  # no answer
        "9, so \\boxed{9}",  # correct
        "The answer is: $(0, 1]$.",  # correct
    ]
    scores, records = grade_completions(problems, completions, path)
    assert [r["extracted"] for r in records] == ["2", "0.5", "9", None, "9", "(0, 1]"]
    expected = {"math": (4 / 6, 6), "math/type=Algebra": (3 / 3, 3), "math/type=Number Theory": (1 / 3, 3),
                "math/level=1": (1 / 2, 2), "math/level=2": (2 / 3, 3), "math/level=10": (1 / 1, 1)}
    assert [s["benchmark"] for s in scores[::2]] == list(expected)  # levels sort numerically
    digest = sha256_of(path)
    for entry in scores:
        value, n = expected[entry["benchmark"]]
        assert entry["metric"] in ("math_verify", "minerva")
        assert entry["value"] == pytest.approx(value) and entry["n"] == n
        assert entry["data_sha256"] == digest and entry["fixture"] is False
    assert records[0] == {"id": "0", "problem": "Compute $1+1$.", "gold": "2", "completion": completions[0],
                          "extracted": "2", "math_verify": True, "minerva": True, "type": "Algebra", "level": "1"}
    with pytest.raises(ValueError, match="6 problems but 5 completions"):
        grade_completions(problems, completions[:5], path)


def test_evaluate_math_end_to_end_with_a_tiny_llama(tmp_path, smollm2_tokenizer, tiny_llama):
    path = _write_jsonl(tmp_path / "arith.jsonl", generate_problems(3, seed=1))
    model = tiny_llama(smollm2_tokenizer, seed=0)
    scores, records = evaluate_math(model, smollm2_tokenizer, path, batch_size=2, max_new_tokens=6, limit=2,
                                    progress=False, fixture=True)
    problems = load_problems(path)[:2]
    expected = generate(model, smollm2_tokenizer, [format_prompt(p["problem"]) for p in problems], batch_size=2,
                        max_new_tokens=6, stop=MATH_STOP, progress=False)
    assert [r["completion"] for r in records] == [samples[0] for samples in expected]
    assert [r["gold"] for r in records] == [p["answer"] for p in problems]
    for record in records:
        assert record["extracted"] == extract_answer(record["completion"])
        assert record == {**record, **grade(record["extracted"], record["gold"])}
    assert [(s["benchmark"], s["metric"]) for s in scores] == [("math", "math_verify"), ("math", "minerva")]
    for entry in scores:
        assert entry["n"] == 2 and entry["limit"] == 2 and entry["fixture"] is True
        assert entry["data_sha256"] == sha256_of(path)
        assert entry["value"] == sum(r[entry["metric"]] for r in records) / 2
