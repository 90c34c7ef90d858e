"""Run control shared by both engines: a gloo group for small host-side agreements (no GPU memory, no
device sync), and stop requests (preemption): a signal (SLURM sends SIGTERM or, with
``--signal=B:USR1@120``, the batch script a USR1 that it turns into a stop file), a stop file, or a
wall-time budget. Every rank finishes the optimizer step it is in; the ranks agree after each step
whether any of them was asked to stop, so they all stop after the same step.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

#: every rank's exit status after a stop request was honoured (checkpoint written)
EXIT_PREEMPTED = 99
STOP_FILE = "STOP"
PREEMPTED_FILE = "preempted.json"

_GROUP = None


def control_group():
    """A gloo group over the world (created once; every rank's first call must be collective), or None
    without torch.distributed."""
    global _GROUP
    if not dist.is_initialized():
        return None
    if _GROUP is None:
        _GROUP = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
    return _GROUP


def agree(value: float, op: str = "max") -> float:
    """``value`` reduced over every rank (``max`` or ``min``) through :func:`control_group`."""
    group = control_group()
    if group is None:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN, group=group)
    return tensor.item()


def signal_numbers(names) -> list[int]:
    """``["SIGTERM", "SIGUSR1"]`` -> signal numbers; a ValueError naming an unknown name."""
    numbers = []
    for name in names:
        number = getattr(signal, str(name).upper(), None)
        if not isinstance(number, signal.Signals) or number in (signal.SIGKILL, signal.SIGSTOP):
            valid = sorted(s.name for s in signal.Signals if s not in (signal.SIGKILL, signal.SIGSTOP))
            raise ValueError(f"{name!r} is not a signal a process can catch; valid: {valid}")
        numbers.append(int(number))
    return numbers


class StopRequest:
    """Collects this rank's reasons to stop; :meth:`agreed` (collective, once per optimizer step)
    answers the same on every rank."""

    def __init__(self, signals=("SIGTERM", "SIGUSR1"), stop_file: str | os.PathLike | None = None,
                 max_minutes: float | None = None):
        self.reason: str | None = None
        self.stop_file = Path(stop_file) if stop_file else None
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None
        self._previous = {}
        numbers = signal_numbers(signals)
        if threading.current_thread() is threading.main_thread():  # Python takes signals on the main thread only
            for number in numbers:
                self._previous[number] = signal.signal(number, self._on_signal)

    def close(self) -> None:
        """Restore the signal handlers this request replaced (the loop calls it when it ends, so a signal
        during the final save or export acts as it would without us)."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _on_signal(self, number, frame) -> None:
        self.reason = self.reason or f"signal {signal.Signals(number).name}"

    def _local_reason(self) -> str | None:
        if self.reason:
            return self.reason
        if self.stop_file is not None and self.stop_file.exists():
            return f"stop file {self.stop_file}"
        if self.deadline is not None and time.monotonic() > self.deadline:
            return "the wall-time budget (output.max_minutes)"
        return None

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (the same answer on every rank)."""
        reason = self._local_reason()
        self.reason = reason
        return bool(agree(1.0 if reason else 0.0, "max"))
