"""Seeding and RNG state, the same for every engine and layout.

The base model is built after ``seed_everything(seed)`` and the adapter is drawn after
``seed_everything(seed + ADAPTER_SEED_OFFSET)``, on every rank and in every engine, so the same
recipe gives the same initial adapter on any layout (the parity tests rely on it).
"""
from __future__ import annotations

import random

import numpy as np
import torch

ADAPTER_SEED_OFFSET = 1


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python, NumPy, torch CPU (and, on a GPU, this device's CUDA) generator states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # adapter dropout on the GPU draws from this device's generator
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
