"""Training metrics shared by every entry point: one row per optimizer step in ``metrics.csv``,
TensorBoard scalars when the package is installed, a tqdm bar, and ``loss.png`` at the end.

Both engines write the same columns (:data:`METRIC_FIELDS`), counted the same way:

* ``loss``: the global batch's mean of the micro-batches' mean token losses;
* ``tokens``: non-padding input tokens of the global batch (all data-parallel ranks);
* ``tokens_per_s_per_gpu``: ``tokens / step_seconds / world_size``;
* ``peak_mem_mib``: peak GPU memory allocated by torch on a GPU, peak RSS of the process on CPU.
"""
from __future__ import annotations

import csv
import os
import resource
import sys
import time
from pathlib import Path

import torch

METRICS_FILE = "metrics.csv"
METRIC_FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s_per_gpu", "step_seconds",
                 "peak_mem_mib")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_memory_mib() -> float:
    """Peak GPU memory allocated by torch on this device, or the process's peak RSS without a GPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def step_row(step: int, steps_per_epoch: int, loss: float, lr: float, grad_norm: float, tokens: int,
             seconds: float, world_size: int) -> dict:
    """The :data:`METRIC_FIELDS` row of global step ``step`` (1-based, i.e. after ``step`` steps)."""
    return {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens": int(tokens),
            "tokens_per_s_per_gpu": tokens / max(seconds, 1e-9) / world_size, "step_seconds": seconds,
            "peak_mem_mib": peak_memory_mib()}


def plot_loss(rows: list[dict], path: str | os.PathLike, title: str = "training loss") -> Path:
    """``loss`` against ``step`` of ``rows`` as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([int(r["step"]) for r in rows], [float(r["loss"]) for r in rows], label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


class MetricsWriter:
    """The logging rank's sink for :func:`step_row` rows: ``metrics.csv``, TensorBoard, tqdm.

    Resuming at ``initial_step`` first drops the rows of steps after it (a previous run may have
    logged steps past its last checkpoint), so the file holds each step once; then one row is
    appended and flushed per step. On ranks that do not log (``enabled=False``) every call is a no-op.
    """

    def __init__(self, out_dir: str | os.PathLike, total_steps: int, initial_step: int = 0, enabled: bool = True,
                 progress: bool = True, desc: str = "train"):
        self.enabled = enabled
        self.rows: list[dict] = []
        self._handle = self._writer = self._board = self._bar = None
        if not enabled:
            return
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / METRICS_FILE
        kept = []
        if self.path.exists():
            with open(self.path, newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) <= initial_step]
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        os.replace(tmp, self.path)
        self._handle = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._handle, fieldnames=METRIC_FIELDS)
        self._board = _tensorboard(self.out_dir)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, desc=desc, dynamic_ncols=True)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        self._writer.writerow({key: row[key] for key in METRIC_FIELDS})
        self._handle.flush()
        if self._board is not None:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s_per_gpu", "peak_mem_mib"):
                self._board.add_scalar(f"train/{key}", row[key], row["step"])
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", grad_norm=f"{row['grad_norm']:.3f}",
                                  tok_s_gpu=f"{row['tokens_per_s_per_gpu']:.0f}", mem=f"{row['peak_mem_mib']:.0f}MiB")
            self._bar.update(1)

    def close(self) -> None:
        """Close the file, the bar and TensorBoard, and draw ``loss.png`` from the whole ``metrics.csv``."""
        if not self.enabled or self._handle is None:
            return
        self._handle.close()
        self._handle = None
        if self._bar is not None:
            self._bar.close()
        if self._board is not None:
            self._board.close()
        with open(self.path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if rows:
            plot_loss(rows, self.out_dir / "loss.png")


def _tensorboard(out_dir: Path):
    """A TensorBoard writer under ``out_dir/tensorboard`` when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out_dir / "tensorboard"))


class MetricsLogger:
    """The single-process default job's log: one row per step (``step``, the caller's metrics,
    ``tokens``, ``tokens_per_s`` since the previous row and ``peak_rss_mib``), written as
    ``metrics.csv`` and drawn as ``loss.png`` at the end."""

    def __init__(self, out_dir: str | os.PathLike):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        self._last_time = time.perf_counter()

    def log(self, step: int, tokens: int, **metrics) -> dict:
        now = time.perf_counter()
        row = {"step": step, **metrics, "tokens": tokens,
               "tokens_per_s": tokens / max(now - self._last_time, 1e-9), "peak_rss_mib": peak_rss_mib()}
        self._last_time = now
        self.rows.append(row)
        return row

    def write_csv(self, name: str = METRICS_FILE) -> Path:
        path = self.out_dir / name
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)
        return path

    def plot_loss(self, name: str = "loss.png", title: str = "training loss") -> Path:
        return plot_loss(self.rows, self.out_dir / name, title)
