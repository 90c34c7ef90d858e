"""``--verify``: the exported models' logits against the source model's on fixed tokens.

The source model is the base (fp32) with the checkpoint's RaSA adapter unmerged, this project's
forward; the merged export is loaded with ``from_pretrained`` and the PEFT export through real peft
(``PeftModel.from_pretrained``). ``num_layers`` builds every model with only the first N decoder layers
(the adapter's units of those layers keep the whole pool), so the check costs N layers at 70B.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..experts import RaSAExperts
from ..inject import CONFIG_ATTR, POOLS_ATTR, decoder_layers, rasa_config_of
from ..layers import RaSALinear


@dataclass(frozen=True)
class Tolerance:
    """An export passes when its KL to the source is at most ``max_kl``, its top-1 agreement at least
    ``min_top1`` and, where ``atol`` is set, every logit within ``atol``."""

    max_kl: float = 1e-3
    min_top1: float = 0.99
    atol: float | None = None


def compare_logits(reference: torch.Tensor, candidate: torch.Tensor) -> dict:
    """Max abs difference, mean KL(reference || candidate) per token, top-1 agreement of ``[b, s, V]`` logits."""
    ref, cand = reference.double(), candidate.double()
    log_p, log_q = ref.log_softmax(-1), cand.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return {"max_abs_diff": (ref - cand).abs().max().item(), "kl": max(kl, 0.0),
            "top1_agreement": (ref.argmax(-1) == cand.argmax(-1)).double().mean().item()}


def truncated_config(source: str | os.PathLike, num_layers: int | None):
    """The HF config of ``source`` with only the first ``num_layers`` decoder layers (per-layer lists cut)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    total = config.num_hidden_layers
    if num_layers is None:
        return config
    if not 1 <= num_layers <= total:
        raise ValueError(f"--verify-layers {num_layers} is not in 1..{total} (the model's layers)")
    config.num_hidden_layers = num_layers
    for name, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == total and name.endswith("layer_types"):
            setattr(config, name, value[:num_layers])
    return config


def load_truncated(source: str | os.PathLike, num_layers: int | None) -> nn.Module:
    """``from_pretrained(source)`` in fp32 (only the first ``num_layers`` layers read when given), eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the layers left out are reported as unused weights; that is the point
    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=truncated_config(source, num_layers),
                                                     dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    return model.eval()


def attach_adapter_(real: nn.Module, adapted: nn.Module) -> nn.Module:
    """Move the RaSA units of ``adapted`` (a RaSA model, base possibly on meta) onto the base modules of
    ``real`` (the same architecture, possibly fewer layers): units of layers ``real`` lacks are left out,
    the pools are shared whole. ``adapted`` is consumed."""
    layers_path, real_layers = decoder_layers(real)
    config = rasa_config_of(adapted)
    wrappers = [(name, m) for name, m in adapted.named_modules() if isinstance(m, (RaSALinear, RaSAExperts))]
    for name, wrapper in wrappers:
        index = int(name[len(layers_path) + 1:].split(".", 1)[0])
        if index >= len(real_layers):
            continue
        base = real.get_submodule(name)
        want = wrapper.base_layer
        if isinstance(wrapper, RaSALinear) and tuple(base.weight.shape) != tuple(want.weight.shape):
            raise ValueError(f"{name}: the base weights have {tuple(base.weight.shape)}, the adapter expects "
                             f"{tuple(want.weight.shape)} (--base does not match --hf-config)")
        wrapper.base_layer = base
        if isinstance(wrapper, RaSAExperts):
            for unit in wrapper.children():
                if unit is not base:
                    object.__setattr__(unit, "experts", base)
        parent_name, _, leaf = name.rpartition(".")
        setattr(real.get_submodule(parent_name), leaf, wrapper)
    setattr(real, POOLS_ATTR, getattr(adapted, POOLS_ATTR))
    object.__setattr__(real, CONFIG_ATTR, config)
    return real.eval()  # the adapted units came from a model in training mode (adapter dropout)


def fixed_tokens(vocab_size: int, batch: int = 4, length: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=generator)


@torch.no_grad()
def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return model(input_ids=tokens).logits.float()


def verify_exports(adapted: nn.Module, base_dir: str | os.PathLike, merged_dir=None, peft_dir=None,
                   num_layers: int | None = None, tolerance: Tolerance = Tolerance(),
                   merged_tolerance: Tolerance | None = None) -> dict:
    """``{"source": ..., "merged": {metrics, "passed"}, "peft": {...}}`` on :func:`fixed_tokens`.
    ``adapted`` (the RaSA model the exports came from) is consumed; ``merged_tolerance`` (default
    ``tolerance``) applies to the merged model, which is stored in the base's dtype."""
    source = load_truncated(base_dir, num_layers)
    if adapted is not None:  # None: a base-only conversion, checked against the HF base itself
        source = attach_adapter_(source, adapted)
    tokens = fixed_tokens(source.config.vocab_size)
    reference = _logits(source, tokens)
    del source
    report = {"tokens": list(tokens.shape), "layers": num_layers or "all"}
    checks = []
    if merged_dir is not None:
        checks.append(("merged", lambda: load_truncated(merged_dir, num_layers), merged_tolerance or tolerance))
    if peft_dir is not None:
        def peft_model():
            from peft import PeftModel

            return PeftModel.from_pretrained(load_truncated(base_dir, num_layers), str(peft_dir)).eval()
        checks.append(("peft", peft_model, tolerance))
    for name, build, tol in checks:
        metrics = compare_logits(reference, _logits(build(), tokens))
        metrics["passed"] = (metrics["kl"] <= tol.max_kl and metrics["top1_agreement"] >= tol.min_top1
                             and (tol.atol is None or metrics["max_abs_diff"] <= tol.atol))
        metrics["tolerance"] = vars(tol).copy()
        report[name] = metrics
    return report
