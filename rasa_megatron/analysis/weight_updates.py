"""Per-layer weight updates ``ΔW_i = W_after - W_before`` of one module type, from two Hugging Face
checkpoints of one model, or random low-rank matrices (the §3 study's inputs)."""
from __future__ import annotations

from pathlib import Path

import torch


def random_updates(L: int, b: int, a: int, R: int, seed: int) -> dict[str, list[torch.Tensor]]:
    """``{"random": L matrices [b, a]}`` of rank ``R`` (products of Gaussian factors)."""
    generator = torch.Generator().manual_seed(seed)
    return {"random": [torch.randn(b, R, generator=generator, dtype=torch.float64)
                       @ torch.randn(R, a, generator=generator, dtype=torch.float64) / R ** 0.5 for _ in range(L)]}


def load_model(path: Path, gguf_file: str | None):
    """A fp32 HF causal LM from a checkpoint directory (a GGUF file inside it when given)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)


def linear_weights(model, module_names: list[str]) -> dict[str, list[torch.Tensor]]:
    """``{path inside a decoder layer: [weight of layer 0, ..., layer L-1]}`` for the named linears.

    Raises:
        ValueError: the model has no ``model.model.layers``, a name matches no linear, or a path is
            missing from some layer.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no decoder layers at model.model.layers")
    weights: dict[str, list[torch.Tensor]] = {}
    for layer in layers:
        for path, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in module_names:
                weights.setdefault(path, []).append(module.weight.detach())
    missing = [name for name in module_names if not any(path.rsplit(".", 1)[-1] == name for path in weights)]
    if missing:
        raise ValueError(f"module(s) {missing} not found in the decoder layers of {type(model).__name__}")
    partial = {path: len(found) for path, found in weights.items() if len(found) != len(layers)}
    if partial:
        raise ValueError(f"module paths missing from some of the {len(layers)} layers (found in): {partial}")
    return weights


def checkpoint_updates(before_dir: Path, before_file: str | None, after_dir: Path, module_names: list[str]
                       ) -> tuple[dict[str, list[torch.Tensor]], dict]:
    """``{module path: [ΔW_i, ...]}`` (float64) between two checkpoints of one architecture, and a
    description of them. Raises ValueError naming what differs (architecture, layers, shapes)."""
    before_model, after_model = load_model(before_dir, before_file), load_model(after_dir, None)
    if type(before_model) is not type(after_model):
        raise ValueError(f"the checkpoints differ in architecture: {type(before_model).__name__} (--before) vs "
                         f"{type(after_model).__name__} (--after)")
    before, after = linear_weights(before_model, module_names), linear_weights(after_model, module_names)
    layout_before = {path: len(weights) for path, weights in before.items()}
    layout_after = {path: len(weights) for path, weights in after.items()}
    if layout_before != layout_after:
        raise ValueError(f"the checkpoints differ in modules or layer counts ({{path: layers}}): {layout_before} "
                         f"(--before) vs {layout_after} (--after)")
    updates = {}
    for path, weights in before.items():
        for index, (w_before, w_after) in enumerate(zip(weights, after[path])):
            if w_before.shape != w_after.shape:
                raise ValueError(f"layer {index} {path}: shape {tuple(w_before.shape)} (--before) differs from "
                                 f"{tuple(w_after.shape)} (--after)")
        updates[path] = [w_after.double() - w_before.double() for w_before, w_after in zip(weights, after[path])]
    source = {"before": str(before_dir / before_file) if before_file else str(before_dir), "after": str(after_dir),
              "architecture": type(before_model).__name__}
    return updates, source
