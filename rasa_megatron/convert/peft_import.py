"""A PEFT LoRA adapter directory -> RaSA adapter tensors (``adapter_state_dict`` keys) with the same
per-layer update ``ΔW_i``: this project's PEFT exports back into RaSA layers, and any plain PEFT LoRA
as RaSA with ``k = 0``.

A RaSA export (``adapter.export_peft_lora``) writes per layer ``lora_A = [A_i ; A_S]`` and ``lora_B =
[B_i | B_S] diag(D_i)``: the pooled rows of ``lora_A`` are bit-identical in every layer of a module type,
which gives ``L k`` (and so ``r``, ``k``). The split of ``lora_B``'s pooled columns into the shared
``B_S`` and per-layer diagonals is recovered up to a scale per pool column (the update is exact):
``B_S[:, j]`` is the column of the layer where it is largest, ``D_i[j]`` the least-squares ratio (the
residual must vanish, else the file is not a RaSA export); private ranks get ``B_i = lora_B`` and ``D = 1``.
PEFT's ``lora_alpha / r`` scaling (``/ sqrt(r)`` with rsLoRA) is folded into ``B``. Stacked MoE expert
weights (``target_parameters``) are split per expert and recovered the same way, per expert index.
"""
from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from pathlib import Path

import torch

from ..adapter import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE
from ..config import RaSAConfig

_KEY = re.compile(r"^base_model\.model\.(?P<layers>.+?\.layers)\.(?P<i>\d+)\.(?P<path>.+)\.lora_(?P<ab>[AB])\.weight$")
#: a pool column's relative residual above this many units of the export dtype's rounding is not a shared
#: column times a diagonal entry (exports reproduce it to about one unit)
RESIDUAL_ULPS = 16


def is_peft_lora(path: str | os.PathLike) -> bool:
    return (Path(path) / PEFT_CONFIG_FILE).is_file() and (Path(path) / PEFT_WEIGHTS_FILE).is_file()


def _read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    if not is_peft_lora(path):
        raise FileNotFoundError(f"{path} is not a PEFT LoRA adapter (needs {PEFT_CONFIG_FILE} and {PEFT_WEIGHTS_FILE})")
    config = json.loads((path / PEFT_CONFIG_FILE).read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r}; only LoRA adapters are read")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{path}: {key} {config[key]} (module types of different ranks) is not supported: "
                             "RaSA has one r and k for every module type")
    for key in ("use_dora", "lora_bias"):
        if config.get(key):
            raise ValueError(f"{path}: {key} is set; a DoRA / biased LoRA has no RaSA equivalent")
    return config, load_file(path / PEFT_WEIGHTS_FILE)


def _split_pool(name: str, lora_B: list[torch.Tensor], private: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``(B_S [b, P], [D_i pooled part [P]])`` from the per-layer pooled columns ``lora_B_i[:, private:]``."""
    stacked = torch.stack([b[:, private:].double() for b in lora_B])  # [L, b, P]
    norms = stacked.norm(dim=1)  # [L, P]
    reference = norms.argmax(dim=0)  # per column, the layer where it is largest
    shared = stacked[reference, :, torch.arange(stacked.shape[-1])].T  # [b, P]
    square = (shared * shared).sum(0)
    # a column zero in every layer (B_S not trained yet) gets D = 1: the update stays zero and the rank
    # keeps a gradient (B_S = 0 with D = 0 would never train again)
    diag = torch.where(square > 0, (stacked * shared).sum(1) / square.clamp(min=1e-300), torch.ones_like(square))
    residual = (stacked - shared * diag[:, None, :]).norm(dim=1)
    worst = (residual / norms.clamp(min=1e-30)).masked_fill(norms == 0, 0).max().item() if stacked.numel() else 0.0
    tolerance = RESIDUAL_ULPS * torch.finfo(lora_B[0].dtype).eps
    if worst > tolerance:
        raise ValueError(f"{name}: the pooled columns of lora_B are not one shared column times a per-layer "
                         f"diagonal (relative residual {worst:.2g} > {tolerance:.2g}): not a RaSA export")
    return shared.to(lora_B[0].dtype), [d.to(lora_B[0].dtype) for d in diag]


#: a Mixtral-style experts module's stacked weights in registration order: PEFT nests one ParamWrapper
#: per targeted weight, the first registered innermost (``adapter._peft_expert_prefix``)
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")
_EXPERT_KEY = re.compile(r"^base_model\.model\.(?P<layers>.+?\.layers)\.(?P<i>\d+)\.(?P<path>.+\.experts)\."
                         r"(?P<depth>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight$")


def _expert_weight(path: Path, experts_path: str, depth: int, targeted: list[str]) -> str:
    """The stacked weight (``...mlp.experts.gate_up_proj``) a PEFT ParamWrapper ``depth`` levels deep adapts."""
    leaves = [w for w in EXPERT_WEIGHTS if any(t == w or t.endswith("." + w) for t in targeted)]
    if not 0 <= depth < len(leaves):
        raise ValueError(f"{path}: a LoRA {depth} ParamWrapper levels below {experts_path}, which has "
                         f"{len(leaves)} targeted weights ({leaves})")
    return f"{experts_path}.{leaves[len(leaves) - 1 - depth]}"


def _rasa_of_module(path: Path, module: str, lora_A: list[torch.Tensor], lora_B: list[torch.Tensor]):
    """One module type's per-layer LoRA factors (scaling folded into B) -> ``(per layer {A_private,
    B_private, diag}, pool {A_shared, B_shared} or None, (r, k))``."""
    R, layers = lora_A[0].shape[0], len(lora_A)
    if any(a.shape[0] != R for a in lora_A) or any(b.shape[1] != R for b in lora_B):
        raise ValueError(f"{path}: the layers of {module} have LoRA factors of different ranks")
    pooled = 0  # trailing rows of lora_A bit-identical in every layer (with one layer: none pooled)
    while layers > 1 and pooled < R and all(torch.equal(a[R - pooled - 1], lora_A[0][R - pooled - 1])
                                            for a in lora_A[1:]):
        pooled += 1
    if pooled % layers:
        raise ValueError(f"{path}: {module}: {pooled} rows of lora_A are shared by its {layers} layers, not a "
                         "multiple of the layer count: not a RaSA export")
    k, private = pooled // layers, R - pooled
    shared_B, pool_diag = _split_pool(module, lora_B, private) if pooled else (None, [None] * layers)
    per_layer = []
    for n in range(layers):
        tensors = {}
        if private:
            tensors["A_private"] = lora_A[n][:private].contiguous()
            tensors["B_private"] = lora_B[n][:, :private].contiguous()
        ones = torch.ones(private, dtype=lora_B[n].dtype)
        tensors["diag"] = torch.cat([ones] + ([pool_diag[n]] if pooled else []))
        per_layer.append(tensors)
    pool = {"A_shared": lora_A[0][private:].contiguous(), "B_shared": shared_B.contiguous()} if pooled else None
    return per_layer, pool, (R - pooled + k, k)


def rasa_from_peft_lora(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], RaSAConfig]:
    """``(adapter tensors with adapter_state_dict keys, RaSAConfig)`` of the PEFT LoRA directory ``path``.
    Stacked MoE expert weights (``target_parameters``, PEFT's ``lora_A [E*R, in]`` expert-major and
    ``lora_B [out, R*E]``) come back per expert, the pooled rows found per expert index (one pool per
    expert index, as RaSA on experts has it). Raises FileNotFoundError / ValueError naming what does not
    fit (missing factors, layers of a module type with different ranks, pooled rows that do not give
    one k, unsupported PEFT options)."""
    path = Path(path)
    config, tensors = _read(path)
    targeted = list(config.get("target_parameters") or [])
    factors: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = defaultdict(lambda: defaultdict(dict))
    experts: set[tuple[str, str]] = set()
    for key, value in tensors.items():
        match = _EXPERT_KEY.match(key) if targeted else None
        if match is not None:
            module = _expert_weight(path, match["path"], match["depth"].count("base_layer."), targeted)
            experts.add((match["layers"], module))
        else:
            match = _KEY.match(key)
            if match is None:
                raise ValueError(f"{path}: tensor {key!r} is not a decoder-layer lora_A / lora_B weight")
            module = match["path"]
        factors[(match["layers"], module)][int(match["i"])][match["ab"]] = value
    if not factors:
        raise ValueError(f"{path} holds no LoRA tensors")
    rank = config.get("r")
    scale = config.get("lora_alpha", rank) / (rank ** 0.5 if config.get("use_rslora") else rank)
    out: dict[str, torch.Tensor] = {}
    shapes = set()
    for (layers_path, module), by_layer in sorted(factors.items()):
        indices = sorted(by_layer)
        incomplete = [i for i in indices if set(by_layer[i]) != {"A", "B"}]
        if incomplete:
            raise ValueError(f"{path}: {layers_path}.{incomplete[0]}.{module} lacks lora_A or lora_B")
        lora_A = [by_layer[i]["A"] for i in indices]
        lora_B = [by_layer[i]["B"] * scale for i in indices]
        if (layers_path, module) in experts:  # [E*R, in] / [out, R*E] -> per expert [R, in] / [out, R]
            R, num_experts = rank, lora_A[0].shape[0] // rank
            if R * num_experts != lora_A[0].shape[0] or lora_B[0].shape[1] != R * num_experts:
                raise ValueError(f"{path}: {module}: lora_A {list(lora_A[0].shape)} / lora_B {list(lora_B[0].shape)} "
                                 f"are not {rank} ranks per expert")
            per_expert = [_rasa_of_module(path, f"{module}[{e}]",
                                          [a.reshape(num_experts, R, -1)[e] for a in lora_A],
                                          [b.reshape(b.shape[0], R, num_experts)[:, :, e] for b in lora_B])
                          for e in range(num_experts)]
            if len({shape for _, _, shape in per_expert}) != 1:
                raise ValueError(f"{path}: the experts of {module} give different (r, k): "
                                 f"{sorted({shape for _, _, shape in per_expert})}")
            per_layer = [{name: torch.stack([layers[n][name] for layers, _, _ in per_expert])
                          for name in per_expert[0][0][n]} for n in range(len(indices))]
            pools = [pool for _, pool, _ in per_expert]
            pool = None if pools[0] is None else {name: torch.stack([p[name] for p in pools]) for name in pools[0]}
            shape = per_expert[0][2]
        else:
            per_layer, pool, shape = _rasa_of_module(path, module, lora_A, lora_B)
        shapes.add(shape)
        for i, layer_tensors in zip(indices, per_layer):
            out.update({f"{layers_path}.{i}.{module}.{name}": t for name, t in layer_tensors.items()})
        if pool is not None:
            out.update({f"rasa_pools.{module}.{name}": t for name, t in pool.items()})
    if len(shapes) != 1:
        raise ValueError(f"{path}: module types give different (r, k): {sorted(shapes)}; RaSA has one r and k")
    (r, k), = shapes
    leaves = sorted({module.rsplit(".", 1)[-1] for key in factors if key not in experts for module in key[1:]})
    rasa_config = RaSAConfig(r=r, k=k, alpha=2.0 * max(r - k, 1), dropout=float(config.get("lora_dropout") or 0.0),
                             target_modules=tuple(leaves),
                             target_parameters=tuple(sorted({module for _, module in experts})))
    return out, rasa_config

