"""MATH-style generative evaluation: the paper's prompt, greedy generation, answer extraction and two
graders reported side by side -- math-verify (``math_verify.parse`` + ``verify``) and lm-eval's Minerva
grader (``normalize_final_answer`` + sympy ``is_equiv``).

Every grader is time-bounded: answers over ``MAX_ANSWER_CHARS`` are graded False without parsing, and
the graders' own signal-alarm timeouts apply (math-verify: ``MATH_VERIFY_PARSE_TIMEOUT_S`` per parse,
``MATH_VERIFY_COMPARE_TIMEOUT_S`` per comparison; lm-eval's ``is_equiv``: its fixed 5 s). Signal alarms
work only in the main thread, so a call from any other thread is graded in a helper process (in its
main thread, same timeouts) that is killed past ``WORKER_DEADLINE_S``. The caller's own SIGALRM
handler and timer (e.g. pytest-timeout's) are restored after each grade.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import math_verify
from lm_eval.tasks.minerva_math.utils import is_equiv, last_boxed_only_string, normalize_final_answer, remove_boxed
from math_verify.errors import TimeoutException as MathVerifyTimeout

from ..tasks.arithmetic import ANSWER_PREFIX, format_prompt
from .generation import generate
from .report import read_jsonl, score

logger = logging.getLogger(__name__)

MATH_MAX_NEW_TOKENS = 512
MATH_TEMPERATURE = 0.0  # greedy
# The Alpaca/MetaMath template the prompt uses: a model that goes on past its answer starts a new one.
MATH_STOP = ("### Instruction:", "Below is an instruction that describes a task.")
MAX_ANSWER_CHARS = 2000
MATH_VERIFY_PARSE_TIMEOUT_S = 2
MATH_VERIFY_COMPARE_TIMEOUT_S = 2
WORKER_START_TIMEOUT_S = 120.0
WORKER_DEADLINE_S = 30.0
_WORKER_MARK = "@@math_grading@@ "
_BOTH_FALSE = {"math_verify": False, "minerva": False}


def _unbox(boxed: str | None) -> str | None:
    """Content of a ``last_boxed_only_string`` result (``\\fbox{..}`` read as ``\\boxed{..}``)."""
    if boxed is None:
        return None
    if boxed.startswith("\\fbox"):
        boxed = "\\boxed" + boxed[len("\\fbox"):]
    try:
        return remove_boxed(boxed)
    except AssertionError:
        return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion: the rest of the line after the last ``The answer is:``
    (stripped, a trailing period and surrounding ``$`` removed, a lone ``\\boxed{}`` unwrapped), else
    the content of the last ``\\boxed{...}`` / ``\\fbox{...}``, else None."""
    index = completion.rfind(ANSWER_PREFIX)
    if index != -1:
        answer = completion[index + len(ANSWER_PREFIX):].strip().split("\n", 1)[0].strip()
        if answer.endswith("."):
            answer = answer[:-1].rstrip()
        answer = answer.strip("$").strip()
        boxed = last_boxed_only_string(answer)
        if boxed is not None and boxed == answer:
            answer = (_unbox(boxed) or "").strip()
        if answer:
            return answer
    answer = _unbox(last_boxed_only_string(completion))
    return None if answer is None else answer.strip()


def _math_verify_correct(predicted: str, gold: str, gold_solution: str | None, parse_timeout: int | None,
                         compare_timeout: int | None) -> bool:
    gold_parsed = math_verify.parse(f"${gold}$", parsing_timeout=parse_timeout)
    if not gold_parsed and gold_solution:
        boxed = last_boxed_only_string(gold_solution)
        if boxed is not None and len(boxed) <= MAX_ANSWER_CHARS:
            gold_parsed = math_verify.parse(boxed, parsing_timeout=parse_timeout)
    predicted_parsed = math_verify.parse(f"${predicted}$", parsing_timeout=parse_timeout)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(math_verify.verify(gold_parsed, predicted_parsed, timeout_seconds=compare_timeout))


def _minerva_correct(predicted: str, gold: str) -> bool:
    return bool(is_equiv(normalize_final_answer(predicted), normalize_final_answer(gold)))


@contextlib.contextmanager
def _caller_alarm_restored():
    """Pause the caller's ITIMER_REAL during the block; afterwards restore its SIGALRM handler (lm-eval's
    ``timeout`` leaves its own installed) and re-arm the timer with the time it had left."""
    handler = signal.getsignal(signal.SIGALRM)
    delay, interval = signal.setitimer(signal.ITIMER_REAL, 0)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if handler is not None:
            signal.signal(signal.SIGALRM, handler)
        if delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(delay - (time.monotonic() - started), 1e-3), interval)


def _grade_in_main_thread(predicted: str, gold: str, gold_solution: str | None) -> dict:
    verdict = dict(_BOTH_FALSE)
    with _caller_alarm_restored():
        try:
            verdict["math_verify"] = _math_verify_correct(predicted, gold, gold_solution,
                                                          MATH_VERIFY_PARSE_TIMEOUT_S, MATH_VERIFY_COMPARE_TIMEOUT_S)
        except (Exception, MathVerifyTimeout) as err:  # noqa: BLE001 - a grader failure is a wrong answer
            logger.debug("math_verify failed on %.200r vs %.200r: %r", predicted, gold, err)
        try:
            verdict["minerva"] = _minerva_correct(predicted, gold)
        except Exception as err:  # noqa: BLE001
            logger.debug("minerva failed on %.200r vs %.200r: %r", predicted, gold, err)
    return verdict


class _GradingWorker:
    """A child Python process grading one pair at a time in its main thread (where the signal timeouts
    work); killed past ``WORKER_DEADLINE_S`` (e.g. a hang in C code that no signal interrupts) and
    started afresh on the next call. Shared by all threads, one request at a time."""

    def __init__(self):
        self._process: subprocess.Popen | None = None
        self._pending = b""
        self._lock = threading.Lock()

    def _start(self) -> None:
        env = dict(os.environ)
        package_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self._process = subprocess.Popen([sys.executable, "-m", __spec__.name, "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self._pending = b""
        if self._read_reply(WORKER_START_TIMEOUT_S) != "ready":
            raise RuntimeError("the grading worker did not start")

    def _read_reply(self, timeout_s: float) -> str | None:
        """The next marked line the worker prints, or None on timeout or exit."""
        deadline = time.monotonic() + timeout_s
        descriptor = self._process.stdout.fileno()
        while True:
            newline = self._pending.find(b"\n")
            if newline != -1:
                line, self._pending = self._pending[:newline].decode("utf-8", "replace"), self._pending[newline + 1:]
                if line.startswith(_WORKER_MARK):
                    return line[len(_WORKER_MARK):]
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([descriptor], [], [], remaining)[0]:
                return None
            chunk = os.read(descriptor, 1 << 16)
            if not chunk:
                return None
            self._pending += chunk

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def grade(self, predicted: str, gold: str, gold_solution: str | None) -> dict:
        with self._lock:
            try:
                if self._process is None or self._process.poll() is not None:
                    self._start()
                self._process.stdin.write((json.dumps([predicted, gold, gold_solution]) + "\n").encode())
                self._process.stdin.flush()
                reply = self._read_reply(WORKER_DEADLINE_S)
                if reply is None:
                    raise TimeoutError(f"no verdict within {WORKER_DEADLINE_S} s")
                verdict = json.loads(reply)
                return {"math_verify": bool(verdict["math_verify"]), "minerva": bool(verdict["minerva"])}
            except Exception as err:  # noqa: BLE001
                logger.debug("grading worker failed on %.200r vs %.200r: %r", predicted, gold, err)
                self.stop()
                return dict(_BOTH_FALSE)


_worker = _GradingWorker()
atexit.register(_worker.stop)


def _serve() -> None:
    """Worker loop: one JSON ``[predicted, gold, gold_solution]`` per stdin line -> one marked verdict."""
    print(_WORKER_MARK + "ready", flush=True)
    for line in sys.stdin:
        predicted, gold, gold_solution = json.loads(line)
        print(_WORKER_MARK + json.dumps(_grade_in_main_thread(predicted, gold, gold_solution)), flush=True)


def grade(predicted: str | None, gold: str, gold_solution: str | None = None) -> dict:
    """``{"math_verify": bool, "minerva": bool}`` for an extracted answer against the gold answer (math-verify
    falls back to ``gold_solution``'s boxed answer when ``gold`` does not parse). None, an answer over
    ``MAX_ANSWER_CHARS``, a grader error or timeout -> False for that grader; never raises."""
    if predicted is None or not isinstance(predicted, str) or not isinstance(gold, str):
        return dict(_BOTH_FALSE)
    if len(predicted) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
        return dict(_BOTH_FALSE)
    if threading.current_thread() is threading.main_thread():
        return _grade_in_main_thread(predicted, gold, gold_solution)
    return _worker.grade(predicted, gold, gold_solution)


def _line_number(path: Path, record_index: int) -> int:
    """1-based line of the ``record_index``-th non-blank line (``read_jsonl`` skips blank lines)."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        seen = -1
        for number, line in enumerate(handle, 1):
            seen += bool(line.strip())
            if seen == record_index:
                return number
    return record_index + 1


def _level(value) -> str | None:
    """``"Level 3"`` (MATH) and ``3`` (MATH-500) both -> ``"3"``."""
    if value is None:
        return None
    text = str(value).strip()
    return text[len("Level"):].strip() if text.startswith("Level") else text


def load_problems(path: str | os.PathLike) -> list[dict]:
    """Problems of a JSONL file as ``{"id", "problem", "answer": str, "solution", "type", "level"}``.

    Accepted: MATH (``problem``, ``solution`` with a boxed answer, ``type``, ``level``; an ``answer`` field
    wins, as in MATH-500, whose ``subject`` is read as the type and ``unique_id`` as the id), the arithmetic
    task's ``question`` / ``answer`` (int) / ``solution``, and any ``question`` or ``problem`` + ``answer``.
    A line without a problem or a gold answer raises ValueError naming the file and line."""
    path = Path(path)
    problems = []
    for index, record in enumerate(read_jsonl(path)):
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{_line_number(path, index)}: expected a JSON object, got "
                             f"{type(record).__name__}")
        problem = record.get("problem", record.get("question"))
        solution = record.get("solution")
        answer = record.get("answer")
        if answer is None or (isinstance(answer, str) and not answer.strip()):
            answer = _unbox(last_boxed_only_string(solution)) if isinstance(solution, str) else None
        if not isinstance(problem, str) or not problem.strip() or answer is None:
            raise ValueError(
                f"{path}:{_line_number(path, index)}: needs a problem and a gold answer; found keys "
                f"{sorted(record)}, expected 'problem' or 'question', and 'answer' or a 'solution' with a "
                "\\boxed{...} answer")
        kind = record.get("type", record.get("subject"))
        problems.append({"id": str(record.get("unique_id", record.get("id", index))), "problem": problem,
                         "answer": str(answer).strip(), "solution": solution if isinstance(solution, str) else None,
                         "type": None if kind is None else str(kind), "level": _level(record.get("level"))})
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def _group_order(value: str):
    return (0, int(value), "") if value.isdigit() else (1, 0, value)


def grade_completions(problems: list[dict], completions: list[str], path: str | os.PathLike, *,
                      fixture: bool = False, progress: bool = False) -> tuple[list[dict], list[dict]]:
    """Extract and grade one completion per problem (``load_problems`` records). Returns (scores, records):
    accuracy of both graders overall (``math``) and per ``math/type=<t>`` / ``math/level=<l>`` where those
    fields are set, each a ``report.score`` of ``path``; one record per problem."""
    from tqdm.auto import tqdm

    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions")
    records = []
    for problem, completion in tqdm(list(zip(problems, completions)), desc="grade math", disable=not progress):
        extracted = extract_answer(completion)
        verdict = grade(extracted, problem["answer"], problem.get("solution"))
        records.append({"id": problem["id"], "problem": problem["problem"], "gold": problem["answer"],
                        "completion": completion, "extracted": extracted, **verdict,
                        "type": problem.get("type"), "level": problem.get("level")})
    groups = {"math": records}
    for field in ("type", "level"):
        values = sorted({r[field] for r in records if r[field] is not None}, key=_group_order)
        groups.update({f"math/{field}={v}": [r for r in records if r[field] == v] for v in values})
    scores = [score(benchmark, metric, sum(r[metric] for r in members) / max(len(members), 1), len(members),
                    path, fixture=fixture)
              for benchmark, members in groups.items() for metric in ("math_verify", "minerva")]
    return scores, records


def evaluate_math(model, tokenizer, path: str | os.PathLike, *, batch_size: int = 16,
                  max_new_tokens: int = MATH_MAX_NEW_TOKENS, limit: int | None = None, progress: bool = True,
                  fixture: bool = False) -> tuple[list[dict], list[dict]]:
    """Greedy generation from the paper's math prompt on ``path``'s problems (the first ``limit``), then
    ``grade_completions``. Returns (scores, records)."""
    problems = load_problems(path)
    if limit is not None:
        problems = problems[:limit]
    prompts = [format_prompt(p["problem"]) for p in problems]
    outputs = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                       temperature=MATH_TEMPERATURE, stop=MATH_STOP, progress=progress, desc="math")
    scores, records = grade_completions(problems, [samples[0] for samples in outputs], path, fixture=fixture,
                                        progress=progress)
    if limit is not None:
        for entry in scores:
            entry["limit"] = limit
    return scores, records


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
