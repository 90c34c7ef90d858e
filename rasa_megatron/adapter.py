"""Saving, loading and exporting RaSA adapters.

Project format (a directory):
    ``rasa_config.json``        format name and version, the RaSAConfig, the base model's identity,
                                module types, dtype and the SHA-256 of the weights file;
    ``rasa_adapter.safetensors`` every adapter tensor under its state-dict key.

``export_peft_lora`` writes the same update as a standard PEFT LoRA adapter of rank
``R = r - k + L k`` (``lora_A = [A_private; A_shared]``, ``lora_B = [B_private | B_shared] diag(D)``,
``lora_alpha = r = R`` so PEFT's scaling is 1).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import RaSAConfig
from .functional import lora_factors
from .inject import (adapted_module_types, adapter_state_dict, apply_rasa, decoder_layers, discover_module_types,
                     expected_adapter_shapes, module_type_of, rasa_config_of, rasa_layers)

FORMAT_NAME = "rasa_megatron.adapter"
FORMAT_VERSION = 1
CONFIG_FILE = "rasa_config.json"
WEIGHTS_FILE = "rasa_adapter.safetensors"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"


class AdapterFormatError(ValueError):
    """An adapter directory is missing, corrupt, or does not fit the model."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _atomic_directory_write(path: str | os.PathLike):
    """Yield a temp dir next to ``path``; on success move each file into ``path`` with ``os.replace``.

    Files are replaced one by one (each atomically); the weights are moved before the JSON that
    names their checksum, so an interrupted save is detected at load time instead of loading stale
    or partial tensors. On any exception nothing in ``path`` is touched.
    """
    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target))
    try:
        yield tmp
        files = sorted(tmp.iterdir(), key=lambda f: f.suffix == ".json")
        for item in files:
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(item, target / item.name)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()


def _base_model_identity(model: nn.Module) -> dict:
    config = getattr(model, "config", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "architectures": list(getattr(config, "architectures", None) or [type(model).__name__]),
        "name_or_path": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
    }


def _require_unmerged(model: nn.Module, action: str) -> None:
    merged = [name for name, layer in rasa_layers(model).items() if layer.merged]
    if merged:
        raise ValueError(f"cannot {action}: the RaSA update is merged into the base weights "
                         f"({len(merged)} layers, e.g. {merged[0]}); call unmerge_adapter(model) first, "
                         "or save the merged model with save_pretrained after merge_and_unload")


def _module_type_meta(mtype) -> dict:
    meta = {"in_features": mtype.in_features, "out_features": mtype.out_features,
            "layer_indices": list(mtype.layer_indices)}
    if mtype.num_experts:
        meta["num_experts"] = mtype.num_experts
    return meta


def save_adapter(model: nn.Module, path: str | os.PathLike) -> None:
    """Write the adapter of ``model`` to directory ``path`` (safetensors + JSON, atomically).

    Raises:
        ValueError: the model has no RaSA adapters, or they are merged into the base weights.
    """
    config = rasa_config_of(model)
    _require_unmerged(model, "save the adapter")
    layers_path, _ = decoder_layers(model)
    module_types = adapted_module_types(model)
    tensors = {key: param.detach().to("cpu").contiguous().clone()
               for key, param in adapter_state_dict(model).items()}
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    with _atomic_directory_write(path) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "producer": FORMAT_NAME})
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "rasa_config": config.to_dict(),
            "base_model": _base_model_identity(model),
            "layers_path": layers_path,
            "module_types": {p: _module_type_meta(m) for p, m in module_types.items()},
            "adapter_dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes),
            "weights_file": WEIGHTS_FILE,
            "weights_sha256": _sha256(tmp / WEIGHTS_FILE),
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_adapter_config(path: str | os.PathLike) -> dict:
    """Parse and check ``rasa_config.json`` of an adapter directory."""
    config_path = Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterFormatError(f"{config_path} not found: {path} is not a RaSA adapter directory "
                                 f"(expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFormatError(f"{config_path} is not valid JSON ({err}); the file is corrupt") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise AdapterFormatError(f"{config_path} is not a {FORMAT_NAME} file "
                                 f"(format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{config_path} has format_version={meta.get('format_version')!r}; "
                                 f"this rasa_megatron reads version {FORMAT_VERSION}")
    return meta


def load_adapter(base_model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the adapter saved at ``path`` to ``base_model`` (in place) and return it.

    Everything is checked before the model is touched: format and version, the weights' checksum
    (truncated/corrupt files), the base model's architecture and module shapes, and the exact set of
    tensor names and shapes (unknown or missing keys are refused).
    """
    meta = read_adapter_config(path)
    weights_path = Path(path) / meta.get("weights_file", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise AdapterFormatError(f"{weights_path} not found; the adapter directory {path} is incomplete")
    if _sha256(weights_path) != meta.get("weights_sha256"):
        raise AdapterFormatError(f"{weights_path} does not match the checksum in {CONFIG_FILE}: "
                                 "the file is truncated or corrupt (or was written by an interrupted save)")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"cannot read {weights_path}: {err}") from err

    config = RaSAConfig.from_dict(meta["rasa_config"])
    saved_type = meta["base_model"].get("model_type")
    model_type = getattr(getattr(base_model, "config", None), "model_type", None)
    if saved_type and model_type and saved_type != model_type:
        raise AdapterFormatError(f"adapter at {path} was trained on a {saved_type!r} model; "
                                 f"the given base model is {model_type!r}")
    layers_path, _ = decoder_layers(base_model)
    module_types = discover_module_types(base_model, config.target_modules, config.target_parameters)
    saved_types = meta["module_types"]
    for type_path in sorted(set(saved_types) | set(module_types)):
        saved, mtype = saved_types.get(type_path), module_types.get(type_path)
        here = None if mtype is None else _module_type_meta(mtype)
        if saved != here:
            raise AdapterFormatError(f"adapter at {path} does not fit the base model: module type "
                                     f"{type_path!r} is {saved} in the adapter but {here} in the model")
    if meta["layers_path"] != layers_path:
        raise AdapterFormatError(f"adapter at {path} has layers at {meta['layers_path']!r}, "
                                 f"the base model at {layers_path!r}")
    expected = expected_adapter_shapes(layers_path, module_types, config)
    unknown, missing = sorted(set(tensors) - set(expected)), sorted(set(expected) - set(tensors))
    if unknown or missing:
        raise AdapterFormatError(f"adapter at {path} has unknown keys {unknown[:5]}{'...' if len(unknown) > 5 else ''}"
                                 f" and lacks keys {missing[:5]}{'...' if len(missing) > 5 else ''} "
                                 f"({len(unknown)} unknown, {len(missing)} missing)")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise AdapterFormatError(f"adapter tensor {key} has shape {tuple(tensors[key].shape)}, "
                                     f"the model needs {shape}")
    dtype = next(iter(tensors.values())).dtype
    apply_rasa(base_model, config, adapter_dtype=dtype)
    params = adapter_state_dict(base_model)
    with torch.no_grad():
        for key, param in params.items():
            param.copy_(tensors[key])
    return base_model


def _peft_expert_prefix(model: nn.Module, name: str, layer) -> str:
    """PEFT's key prefix for a stacked expert weight: PEFT nests one ``ParamWrapper`` per targeted
    parameter of a module, the first registered innermost, so the weight ``j`` places before the last
    targeted one sits ``j`` levels of ``base_layer.`` deep (checked against real PEFT in the tests)."""
    experts_path = name.rpartition(".")[0]
    wrapper = model.get_submodule(experts_path)
    targeted = [pname for pname, _ in wrapper.base_layer.named_parameters(recurse=False)
                if pname in wrapper._modules]
    depth = len(targeted) - 1 - targeted.index(layer.weight_name)
    return f"base_model.model.{experts_path}." + "base_layer." * depth


def peft_lora_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """PEFT LoRA tensors of the RaSA update and the rank of each module path.

    Linears: ``base_model.model.<path>.lora_A.weight: [R, in]`` and ``...lora_B.weight: [out, R]``.
    Stacked expert weights ``[E, out, in]`` (PEFT ``target_parameters``): ``lora_A: [E*R, in]``
    expert-major and ``lora_B: [out, R*E]`` with column ``ρ*E + e`` holding rank ``ρ`` of expert
    ``e`` (PEFT's ``ParamWrapper`` layout), under the experts module's path.

    Returns:
        the tensors and ``{<unit path>: R}``.
    """
    tensors, ranks = {}, {}
    with torch.no_grad():
        for name, layer in rasa_layers(model).items():
            lora_A, lora_B = lora_factors(*layer._factors())
            if getattr(layer, "num_experts", 0):
                num_experts, rank = lora_A.shape[0], lora_A.shape[1]
                prefix = _peft_expert_prefix(model, name, layer)
                lora_A = lora_A.reshape(num_experts * rank, lora_A.shape[-1])
                lora_B = lora_B.permute(1, 2, 0).reshape(lora_B.shape[1], rank * num_experts)
            else:
                prefix = f"base_model.model.{name}."
            tensors[f"{prefix}lora_A.weight"] = lora_A.detach().cpu().contiguous().clone()
            tensors[f"{prefix}lora_B.weight"] = lora_B.detach().cpu().contiguous().clone()
            ranks[name] = layer.effective_rank
    return tensors, ranks


def export_peft_lora(model: nn.Module, path: str | os.PathLike, base_model_name_or_path: str | None = None) -> None:
    """Write the RaSA update of ``model`` as a standard PEFT LoRA adapter directory.

    Loaded with ``peft.PeftModel.from_pretrained(base, path)`` it reproduces the RaSA model. The rank
    is ``R = r - k + L k`` (serving stacks need ``max_lora_rank >= R``); linear module types with
    another ``L`` get their rank through ``rank_pattern``/``alpha_pattern``. Stacked expert weights
    go to PEFT's ``target_parameters``; PEFT cannot apply dropout there, so such an export records
    ``lora_dropout = 0`` (inference is unaffected; dropout only acts in training).
    """
    from peft import LoraConfig

    config = rasa_config_of(model)
    _require_unmerged(model, "export a PEFT adapter")
    tensors, ranks = peft_lora_tensors(model)
    layers_path, _ = decoder_layers(model)
    units = rasa_layers(model)
    rank_by_type = {module_type_of(name, layers_path): rank for name, rank in ranks.items()}
    expert_types = sorted({module_type_of(name, layers_path) for name, unit in units.items()
                           if getattr(unit, "num_experts", 0)})
    linear_ranks = {p: r for p, r in rank_by_type.items() if p not in expert_types}
    leaves = [p.rsplit(".", 1)[-1] for p in linear_ranks]
    target_names = {p: (p.rsplit(".", 1)[-1] if leaves.count(p.rsplit(".", 1)[-1]) == 1 else p)
                    for p in linear_ranks}
    common_rank = Counter(rank_by_type.values()).most_common(1)[0][0]
    odd_experts = {p: rank_by_type[p] for p in expert_types if rank_by_type[p] != common_rank}
    if odd_experts:
        raise ValueError(f"cannot export expert weights {odd_experts} whose effective rank differs from the "
                         f"adapter's common rank {common_rank}: PEFT's rank_pattern does not reach target_parameters")
    pattern = {target_names[p]: rank for p, rank in linear_ranks.items() if rank != common_rank}
    identity = _base_model_identity(model)
    lora_config = LoraConfig(
        r=common_rank, lora_alpha=common_rank, rank_pattern=pattern, alpha_pattern=dict(pattern),
        target_modules=sorted(target_names.values()) or None, target_parameters=expert_types or None,
        lora_dropout=0.0 if expert_types else config.dropout, bias="none",
        task_type="CAUSAL_LM", base_model_name_or_path=base_model_name_or_path or identity["name_or_path"],
    )
    with _atomic_directory_write(path) as tmp:
        save_file(tensors, tmp / PEFT_WEIGHTS_FILE, metadata={"format": "pt"})
        lora_config.save_pretrained(tmp)


def assign_adapter_tensors_(model: nn.Module, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """Put ``tensors`` (keys of :func:`adapter_state_dict`) into the adapter of ``model``, which may
    live on the meta device; names and shapes must match exactly (else ValueError listing them)."""
    params = adapter_state_dict(model)
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model's adapter: missing {missing[:5]} "
                         f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    bad = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(p.shape)}" for k, p in params.items()
           if tuple(tensors[k].shape) != tuple(p.shape)]
    if bad:
        raise ValueError(f"adapter shapes differ: {bad[:5]}")
    modules = dict(model.named_modules())
    for key, value in tensors.items():
        owner, _, name = key.rpartition(".")
        module = modules[owner]
        old = getattr(module, name)
        if old.device.type == "meta":
            setattr(module, name, nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad))
        else:
            with torch.no_grad():
                old.copy_(value.to(old.dtype))
    return model


def hf_model_with_adapter(config, rasa_config: RaSAConfig, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A meta-device HF model of ``config`` (a transformers config or a directory holding one) whose
    adapter holds ``tensors`` (:func:`adapter_state_dict` keys): enough for :func:`save_adapter` and
    :func:`export_peft_lora` without base weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not hasattr(config, "model_type"):
        config = AutoConfig.from_pretrained(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return assign_adapter_tensors_(apply_rasa(model, rasa_config), tensors)
