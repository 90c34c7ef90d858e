"""Training-loop helpers shared by the example entry points: metrics CSV + PNG, memory, throughput."""
from __future__ import annotations

import csv
import os
import resource
import sys
import time
from pathlib import Path


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def count_parameters(model) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


class MetricsLogger:
    """Appends one row per step to ``metrics.csv`` and draws ``loss.png`` from it.

    Each row gets ``step``, the caller's metrics, ``tokens_per_s`` (tokens since the previous row
    over the wall time since then) and ``peak_rss_mib``.
    """

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

    def write_csv(self, name: str = "metrics.csv") -> Path:
        path = self.out_dir / name
        tmp = path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, path)
        return path

    def plot_loss(self, name: str = "loss.png", title: str = "training loss") -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r["step"] for r in self.rows], [r["loss"] for r in self.rows], label="loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = self.out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path


def sft_train_step(model, batch: dict, optimizer, scheduler=None, max_grad_norm: float | None = 1.0) -> float:
    """One optimizer step on a causal-LM batch (``input_ids``, ``labels``, ``attention_mask``); returns the loss."""
    device = next(model.parameters()).device
    loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
    loss.backward()
    if max_grad_norm is not None:
        import torch

        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
