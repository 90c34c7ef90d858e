"""lm-eval on an in-memory model: ``HFLM(pretrained=model, tokenizer=tokenizer)`` + ``simple_evaluate``
over the project's local tasks (``lm_tasks/*.yaml``: HellaSwag, WinoGrande, ARC-Challenge with the
stock prompts and metrics, reading the user's JSONL in the Hugging Face schema).

``data_dir`` holds ``hellaswag.jsonl`` (validation), ``winogrande.jsonl`` (winogrande_xl
validation) and ``arc_challenge.jsonl`` (ARC-Challenge test); README gives the one-line export for
users who have the data sets. Nothing is fetched from a hub (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .report import score

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
#: local task name -> (data file in data_dir, reported benchmark, metrics)
LOCAL_TASKS = {
    "rasa_hellaswag": ("hellaswag.jsonl", "hellaswag", ("acc", "acc_norm")),
    "rasa_winogrande": ("winogrande.jsonl", "winogrande", ("acc",)),
    "rasa_arc_challenge": ("arc_challenge.jsonl", "arc_challenge", ("acc", "acc_norm")),
}
ALIASES = {"hellaswag": "rasa_hellaswag", "winogrande": "rasa_winogrande", "arc_challenge": "rasa_arc_challenge"}


def resolve_tasks(tasks, data_dir: str | os.PathLike) -> dict[str, Path]:
    """``{local task: data file}``; unknown names and missing files raise naming what is valid."""
    names = [ALIASES.get(t, t) for t in ([tasks] if isinstance(tasks, str) else tasks)]
    unknown = [t for t in names if t not in LOCAL_TASKS]
    if unknown or not names:
        raise ValueError(f"unknown lm-eval task(s) {unknown or names}; valid: {sorted(LOCAL_TASKS)} "
                         f"(or {sorted(ALIASES)})")
    files = {t: Path(data_dir) / LOCAL_TASKS[t][0] for t in names}
    missing = {t: str(p) for t, p in files.items() if not p.is_file()}
    if missing:
        raise FileNotFoundError(f"data file(s) not found: {missing}; {data_dir} must hold "
                                f"{[LOCAL_TASKS[t][0] for t in names]} (JSONL, Hugging Face schema; see README)")
    return files


def render_tasks(files: dict[str, Path], into: Path) -> Path:
    """Copy the task YAMLs (with the data file paths filled in) and their document functions to
    ``into``; returns it (the ``include_path`` of lm-eval's TaskManager)."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS_DIR / "rasa_task_utils.py", into / "rasa_task_utils.py")
    for task, data_file in files.items():
        text = (TASKS_DIR / f"{task}.yaml").read_text()
        (into / f"{task}.yaml").write_text(text.replace("__DATA_FILE__", str(data_file.resolve())))
    return into


def as_lm(model, tokenizer=None, batch_size: int = 8, max_length: int | None = None):
    """An lm-eval ``LM``: given as one, or an HF model instance wrapped in ``HFLM`` (tokenizer required)."""
    from lm_eval.api.model import LM

    if isinstance(model, LM):
        return model
    if tokenizer is None:
        raise ValueError("evaluate_lm needs the tokenizer with an in-memory HF model (HFLM(pretrained=model, "
                         "tokenizer=tokenizer))")
    from lm_eval.models.huggingface import HFLM

    kwargs = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **kwargs)


def evaluate_lm(model, tokenizer, tasks, data_dir: str | os.PathLike, *, batch_size: int = 8,
                limit: int | None = None, num_fewshot: int = 0, fixture: bool = False,
                max_length: int | None = None) -> tuple[list[dict], dict[str, list[dict]]]:
    """Run the local lm-eval tasks on ``model`` (an HF causal LM with ``tokenizer``, or an lm-eval
    ``LM``). Returns ``(scores, samples)``: one :func:`report.score` per task and metric (with the
    data file's sha256 and n), and per task the per-document records
    ``{doc_id, target, requests: [(context, continuation)], loglikelihoods: [per request], acc, acc_norm?}``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    files = resolve_tasks(tasks, data_dir)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = as_lm(model, tokenizer, batch_size, max_length)
    with tempfile.TemporaryDirectory(prefix="rasa_lm_tasks_") as tmp:
        manager = TaskManager(include_path=str(render_tasks(files, Path(tmp))), include_defaults=False)
        output = simple_evaluate(model=lm, tasks=list(files), task_manager=manager, num_fewshot=num_fewshot,
                                 limit=limit, log_samples=True, bootstrap_iters=0, random_seed=0,
                                 numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    if output is None:  # only on non-zero ranks of a distributed lm-eval run
        return [], {}
    scores, samples = [], {}
    for task, data_file in files.items():
        _, benchmark, metrics = LOCAL_TASKS[task]
        result = output["results"][task]
        n = int(output["n-samples"][task]["effective"])
        scores += [score(benchmark, metric, result[f"{metric},none"], n, data_file, fixture=fixture,
                         lm_eval_task=task, num_fewshot=num_fewshot) for metric in metrics]
        samples[benchmark] = [
            {"doc_id": s["doc_id"], "target": s["target"], "requests": [list(a) for a in s["arguments"]],
             "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
             **{metric: float(s[metric]) for metric in metrics}}
            for s in output["samples"][task]]
    return scores, samples
