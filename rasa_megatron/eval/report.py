"""Evaluation results as JSON + a markdown table; every score carries its data file's sha256 and n.

A result is ``{"benchmark", "metric", "value", "n", "data", "data_sha256", "fixture", ...}``; ``fixture``
is True for the small files the repository writes itself, and every report says so next to the score.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..training.state_io import write_bytes_durably


def sha256_of(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def score(benchmark: str, metric: str, value: float, n: int, data: str | os.PathLike | None,
          fixture: bool = False, **extra) -> dict:
    """One reported number with its provenance (``data``: the file scored, hashed here)."""
    return {"benchmark": benchmark, "metric": metric, "value": float(value), "n": int(n),
            "data": None if data is None else str(data),
            "data_sha256": None if data is None else sha256_of(data), "fixture": bool(fixture), **extra}


def markdown_table(scores: list[dict], title: str | None = None) -> str:
    """``| benchmark | metric | value | n | data (sha256) |``; fixture rows are labelled FIXTURE."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| benchmark | metric | value | n | data | sha256 |", "|---|---|---|---|---|---|"]
    for s in scores:
        name = s["benchmark"] + (" (FIXTURE data, not the benchmark)" if s.get("fixture") else "")
        data = Path(s["data"]).name if s.get("data") else "-"
        sha = (s.get("data_sha256") or "-")[:12]
        lines.append(f"| {name} | {s['metric']} | {s['value']:.4f} | {s['n']} | {data} | {sha} |")
    if any(s.get("fixture") for s in scores):
        lines += ["", "Rows marked FIXTURE score small files this repository generates for its tests; they "
                      "say nothing about the model's quality on the real benchmark."]
    return "\n".join(lines) + "\n"


def write_text(path: str | os.PathLike, text: str) -> None:
    """``text`` (UTF-8) to ``path`` atomically and durably (``training.state_io.write_bytes_durably``),
    creating the parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_durably(path, text.encode("utf-8"))


def write_report(out_dir: str | os.PathLike, scores: list[dict], meta: dict | None = None,
                 samples: dict[str, list[dict]] | None = None, title: str = "Evaluation") -> dict[str, Path]:
    """Write ``results.json`` (meta + scores), ``results.md`` and ``samples_<benchmark>.jsonl``;
    each file atomically. Returns the paths written."""
    out = Path(out_dir)
    written = {"json": out / "results.json", "markdown": out / "results.md"}
    write_text(written["json"], json.dumps({"meta": meta or {}, "scores": scores}, indent=2, default=str))
    write_text(written["markdown"], markdown_table(scores, title))
    for name, records in (samples or {}).items():
        path = out / f"samples_{name}.jsonl"
        write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in records))
        written[f"samples_{name}"] = path
    return written


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a JSON-lines file (``.jsonl`` or ``.jsonl.gz``); a bad line raises naming file and line."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err.msg})") from None
    return records
