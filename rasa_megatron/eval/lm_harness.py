"""lm-eval on an in-memory model: ``HFLM(pretrained=model, tokenizer=tokenizer)`` + ``simple_evaluate``
over the project's local tasks (``lm_tasks/*.yaml``: HellaSwag, WinoGrande, ARC-Challenge with the
stock prompts and metrics, reading the user's JSONL in the Hugging Face schema).

``data_dir`` holds ``hellaswag.jsonl`` (validation), ``winogrande.jsonl`` (winogrande_xl
validation) and ``arc_challenge.jsonl`` (ARC-Challenge test); README gives the one-line export for
users who have the data sets. Few-shot runs draw their examples from the stock tasks' training
splits, ``<name>_train.jsonl`` beside them (never from the scored split). Nothing is fetched from a
hub (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .fixtures import FIXTURE_MARKER
from .report import read_jsonl, score

TASKS_DIR = Path(__file__).resolve().parent / "lm_tasks"
#: local task name -> (data file in data_dir, reported benchmark, metrics)
LOCAL_TASKS = {
    "rasa_hellaswag": ("hellaswag.jsonl", "hellaswag", ("acc", "acc_norm")),
    "rasa_winogrande": ("winogrande.jsonl", "winogrande", ("acc",)),
    "rasa_arc_challenge": ("arc_challenge.jsonl", "arc_challenge", ("acc", "acc_norm")),
}
#: the fields each task reads (Hugging Face schema)
REQUIRED_FIELDS = {
    "rasa_hellaswag": ("activity_label", "ctx_a", "ctx_b", "endings", "label"),
    "rasa_winogrande": ("sentence", "option1", "option2", "answer"),
    "rasa_arc_challenge": ("question", "choices", "answerKey"),
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
    for task, path in files.items():
        check_lm_file(task, path)
    return files


def train_file_for(data_file: Path) -> Path:
    """Where a task's few-shot examples live: ``hellaswag.jsonl`` -> ``hellaswag_train.jsonl``."""
    return data_file.with_name(data_file.stem + "_train.jsonl")


def _schema_error(task: str, path: Path, line: int, problem: str) -> ValueError:
    return ValueError(f"{path}:{line}: {problem}; {task} reads the Hugging Face schema with fields "
                      f"{list(REQUIRED_FIELDS[task])}")


def check_lm_file(task: str, path: Path) -> None:
    """Every record of ``path`` has the fields ``task`` reads, with usable values; raises ValueError
    naming the file and line otherwise (before any model is loaded)."""
    records = read_jsonl(path)
    if not records:
        raise ValueError(f"{path}: no documents")
    for line, doc in enumerate(records, 1):  # read_jsonl skips blank lines: numbers count documents
        if not isinstance(doc, dict):
            raise _schema_error(task, path, line, f"expected a JSON object, got {type(doc).__name__}")
        missing = [f for f in REQUIRED_FIELDS[task] if f not in doc]
        if missing:
            raise _schema_error(task, path, line, f"missing {missing}")
        if task == "rasa_winogrande" and ("_" not in str(doc["sentence"]) or str(doc["answer"]) not in ("1", "2")):
            raise _schema_error(task, path, line, "a WinoGrande sentence needs a '_' blank and answer '1' or '2'")
        if task == "rasa_hellaswag" and (not isinstance(doc["endings"], list) or not doc["endings"]
                                         or not str(doc["label"]).isdigit()
                                         or int(doc["label"]) >= len(doc["endings"])):
            raise _schema_error(task, path, line, "HellaSwag needs a list of endings and a label indexing it")
        if task == "rasa_arc_challenge":
            choices = doc["choices"]
            if not isinstance(choices, dict) or doc["answerKey"] not in choices.get("label", []) \
                    or len(choices.get("text", [])) != len(choices.get("label", [])):
                raise _schema_error(task, path, line, "ARC needs choices {text, label} and an answerKey among "
                                                      "the labels")


def check_lm_inputs(tasks, data_dir: str | os.PathLike, num_fewshot: int = 0) -> tuple[dict, dict]:
    """``(files, train_files)`` for ``tasks``, every file checked; few-shot examples come from each
    task's training split (``<name>_train.jsonl``), never from the documents being scored."""
    files = resolve_tasks(tasks, data_dir)
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    train_files = {}
    if num_fewshot > 0:
        train_files = {t: train_file_for(p) for t, p in files.items()}
        missing = {t: str(p) for t, p in train_files.items() if not p.is_file()}
        if missing:
            raise FileNotFoundError(f"num_fewshot={num_fewshot} draws examples from each task's training split; "
                                    f"not found: {missing} (the stock tasks' train splits, same schema)")
        for task, path in train_files.items():
            check_lm_file(task, path)
    return files, train_files


def render_tasks(files: dict[str, Path], into: Path, train_files: dict[str, Path] | None = None) -> Path:
    """Copy the task YAMLs (with the data file paths filled in; ``train_files`` add the training split
    few-shot examples come from) and their document functions to ``into``; returns it (the
    ``include_path`` of lm-eval's TaskManager)."""
    into.mkdir(parents=True, exist_ok=True)
    shutil.copy(TASKS_DIR / "rasa_task_utils.py", into / "rasa_task_utils.py")
    for task, data_file in files.items():
        text = (TASKS_DIR / f"{task}.yaml").read_text().replace("__DATA_FILE__", str(data_file.resolve()))
        train = (train_files or {}).get(task)
        if train is not None:
            text = text.replace("  data_files:\n", f"  data_files:\n    train: {train.resolve()}\n", 1)
            text += "training_split: train\nfewshot_split: train\n"
        (into / f"{task}.yaml").write_text(text)
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
    files, train_files = check_lm_inputs(tasks, data_dir, num_fewshot)
    if limit is not None and limit <= 0:
        raise ValueError(f"limit must be positive, got {limit}")
    fixture = fixture or (Path(data_dir) / FIXTURE_MARKER).is_file()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = as_lm(model, tokenizer, batch_size, max_length)
    with tempfile.TemporaryDirectory(prefix="rasa_lm_tasks_") as tmp:
        manager = TaskManager(include_path=str(render_tasks(files, Path(tmp), train_files)),
                              include_defaults=False)
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
                         lm_eval_task=task, num_fewshot=num_fewshot,
                         **({"limit": limit} if limit is not None else {})) for metric in metrics]
        samples[benchmark] = [
            {"doc_id": s["doc_id"], "target": s["target"], "requests": [list(a) for a in s["arguments"]],
             "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
             **{metric: float(s[metric]) for metric in metrics}}
            for s in output["samples"][task]]
    return scores, samples
