"""Put RaSA into Hugging Face decoder-only causal LMs (Llama, Mistral, Qwen2, ...) and take it out.

Module types are grouped by their path inside the decoder layer (``self_attn.q_proj``,
``mlp.down_proj``, ...); all layers' modules of one type share one :class:`RankPool`. Layer
indices come from the model's decoder-layer ``nn.ModuleList``, not from parsing names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import RaSAConfig
from .experts import EXPERT_WEIGHT_NAMES, RaSAExperts, RaSAExpertWeights, check_fused_experts, expert_weight_shape
from .layers import RaSALinear
from .pool import RankPool

#: the per-layer units that carry a RaSA update (one target linear / one stacked expert weight)
ADAPTER_UNITS = (RaSALinear, RaSAExpertWeights)

POOLS_ATTR = "rasa_pools"
CONFIG_ATTR = "rasa_config"


@dataclass(frozen=True)
class ModuleType:
    """One group of same-shaped linears that share a pool.

    Attributes:
        path: path inside a decoder layer, e.g. ``"self_attn.q_proj"`` or, for a stacked expert
            weight, ``"mlp.experts.gate_up_proj"``.
        in_features, out_features: the linear's (or each expert's) shape.
        layer_indices: decoder layers that contain it (``L = len(layer_indices)``).
        num_experts: ``E`` for a stacked expert weight ``[E, out, in]``, 0 for a linear.
    """

    path: str
    in_features: int
    out_features: int
    layer_indices: tuple[int, ...]
    num_experts: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_indices)


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder-layer stack of a HF causal LM and its path, e.g. ``("model.layers", ModuleList)``."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        for name, module in model.named_modules():
            if module is layers:
                return name, layers
    raise ValueError(
        f"{type(model).__name__} has no decoder-layer stack (`model.get_decoder().layers`); "
        "apply_rasa supports decoder-only Hugging Face causal LMs such as Llama, Mistral and Qwen2")


def _matches_suffix(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def discover_module_types(model: nn.Module, target_modules, target_parameters=()) -> dict[str, ModuleType]:
    """Find every target linear and target stacked expert weight in every decoder layer; group by path.

    Raises:
        ValueError: a target matches nothing (lists what exists), a matched module is not an
            ``nn.Linear`` / not a fused experts module, or one module type has different shapes in
            different layers.
    """
    _, layers = decoder_layers(model)
    targets = set(target_modules)
    shapes: dict[str, dict[int, tuple[int, ...]]] = {}
    available: set[str] = set()
    available_params: set[str] = set()
    found_params: set[str] = set()
    for index, layer in enumerate(layers):
        for path, module in layer.named_modules():
            leaf = path.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear):
                available.add(leaf)
            if isinstance(module, (RaSALinear, RaSAExperts)):
                raise ValueError("the model already has RaSA adapters; merge_and_unload it first")
            for pname, param in module.named_parameters(recurse=False):
                full = f"{path}.{pname}" if path else pname
                if len(getattr(param, "ds_shape", param.shape)) == 3:
                    available_params.add(full)
                hits = [t for t in target_parameters if _matches_suffix(full, t)]
                if not hits:
                    continue
                found_params.update(hits)
                check_fused_experts(module, f"layers.{index}.{path}")
                num_experts, out_features, in_features = expert_weight_shape(module, pname)
                shapes.setdefault(full, {})[index] = (in_features, out_features, num_experts)
            if leaf not in targets:
                continue
            if not isinstance(module, nn.Linear):
                raise ValueError(f"target module {leaf!r} at layers.{index}.{path} is a "
                                 f"{type(module).__name__}, not nn.Linear; RaSA adapts linear layers"
                                 + (" (stacked expert weights go in target_parameters)"
                                    if any(n.rsplit(".", 1)[-1] in EXPERT_WEIGHT_NAMES for n in available_params) else ""))
            shapes.setdefault(path, {})[index] = (module.in_features, module.out_features, 0)
    found = {path.rsplit(".", 1)[-1] for path, by_layer in shapes.items() if not next(iter(by_layer.values()))[2]}
    missing = sorted(targets - found)
    if missing:
        hint = (f"; 3-D expert parameters (for target_parameters) are {sorted(available_params)}"
                if available_params else "")
        raise ValueError(f"unknown target module(s) {missing} for {type(model).__name__}; "
                         f"linear modules in its decoder layers are {sorted(available)}{hint}")
    missing_params = sorted(set(target_parameters) - found_params)
    if missing_params:
        raise ValueError(f"unknown target parameter(s) {missing_params} for {type(model).__name__}; "
                         f"3-D expert parameters in its decoder layers are {sorted(available_params) or 'none'}")
    module_types = {}
    for path, by_layer in shapes.items():
        distinct = sorted(set(by_layer.values()))
        if len(distinct) > 1:
            detail = ", ".join(f"layer {i}: in={s[0]} out={s[1]}" + (f" experts={s[2]}" if s[2] else "")
                               for i, s in sorted(by_layer.items()))
            raise ValueError(f"module type {path!r} has different shapes across layers ({detail}); "
                             "RaSA pools ranks across layers and needs one shape per module type")
        (in_features, out_features, num_experts), = distinct
        module_types[path] = ModuleType(path, in_features, out_features, tuple(sorted(by_layer)), num_experts)
    return module_types


def _set_nested(container: nn.ModuleDict, path: str, module: nn.Module) -> None:
    *parents, leaf = path.split(".")
    for name in parents:
        if name not in container:
            container[name] = nn.ModuleDict()
        container = container[name]
    container[leaf] = module


def _get_nested(container: nn.Module, path: str) -> nn.Module:
    for name in path.split("."):
        container = container[name] if isinstance(container, nn.ModuleDict) else getattr(container, name)
    return container


def has_rasa(model: nn.Module) -> bool:
    return any(isinstance(m, ADAPTER_UNITS) for m in model.modules())


def apply_rasa(model: nn.Module, config: RaSAConfig, adapter_dtype: torch.dtype = torch.float32) -> nn.Module:
    """Replace the target linears of ``model`` by :class:`RaSALinear` in place.

    All base parameters are frozen; only the adapters (private factors, diagonals and one pool per
    module type, registered under ``model.rasa_pools``) are trainable. Initialisation follows the
    paper (eq. 6) from the global torch RNG: pools in module-type order, then layers in order.

    Args:
        model: a Hugging Face decoder-only causal LM.
        config: the :class:`RaSAConfig`.
        adapter_dtype: dtype of the adapter parameters (fp32 master weights by default).

    Returns:
        The same ``model`` object, adapted.
    """
    if not isinstance(config, RaSAConfig):
        raise TypeError(f"config must be a RaSAConfig, got {type(config).__name__}")
    if has_rasa(model):
        raise ValueError("the model already has RaSA adapters; merge_and_unload it first")
    module_types = discover_module_types(model, config.target_modules, config.target_parameters)
    _, layers = decoder_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    pools = nn.ModuleDict()
    pool_by_path: dict[str, RankPool | None] = {}
    for path, mtype in module_types.items():
        pool = None
        if config.k:
            owner_path, _, pname = path.rpartition(".")
            first = layers[mtype.layer_indices[0]]
            device = (getattr(_get_nested(first, owner_path), pname) if mtype.num_experts
                      else _get_nested(first, path).weight).device
            pool = RankPool(mtype.in_features, mtype.out_features, config.pool_rank(mtype.num_layers),
                            mtype.num_layers, dtype=adapter_dtype, device=device, num_experts=mtype.num_experts)
            _set_nested(pools, path, pool)
        pool_by_path[path] = pool
    expert_adapters: dict[tuple[int, str], dict[str, RaSAExpertWeights]] = {}
    for path, mtype in module_types.items():
        parent_path, _, leaf = path.rpartition(".")
        for index in mtype.layer_indices:
            parent = _get_nested(layers[index], parent_path) if parent_path else layers[index]
            if mtype.num_experts:  # `parent` is the experts module, `leaf` its stacked weight
                expert_adapters.setdefault((index, parent_path), {})[leaf] = RaSAExpertWeights(
                    parent, leaf, config.private_rank, pool_by_path[path], config.alpha, config.dropout,
                    layer_index=index, dtype=adapter_dtype)
                continue
            base = getattr(parent, leaf)
            setattr(parent, leaf, RaSALinear(base, config.private_rank, pool_by_path[path], config.alpha,
                                             config.dropout, layer_index=index, dtype=adapter_dtype))
    for (index, experts_path), adapters in expert_adapters.items():
        owner_path, _, leaf = experts_path.rpartition(".")
        owner = _get_nested(layers[index], owner_path) if owner_path else layers[index]
        setattr(owner, leaf, RaSAExperts(getattr(owner, leaf), adapters))
    setattr(model, POOLS_ATTR, pools)
    object.__setattr__(model, CONFIG_ATTR, config)
    return model


def rasa_config_of(model: nn.Module) -> RaSAConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None or not has_rasa(model):
        raise ValueError(f"{type(model).__name__} has no RaSA adapters (apply_rasa or load_adapter first)")
    return config


def rasa_layers(model: nn.Module) -> dict[str, RaSALinear | RaSAExpertWeights]:
    """Every adapter unit (:class:`RaSALinear`, :class:`RaSAExpertWeights`) by its full module path,
    e.g. ``model.layers.0.self_attn.q_proj`` or ``model.layers.0.mlp.experts.gate_up_proj``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ADAPTER_UNITS)}


def module_type_of(layer_path: str, layers_path: str) -> str:
    """``"model.layers.3.self_attn.q_proj"`` -> ``"self_attn.q_proj"`` given ``layers_path="model.layers"``."""
    prefix = layers_path + "."
    if not layer_path.startswith(prefix):
        raise ValueError(f"{layer_path!r} is not inside the decoder layers {layers_path!r}")
    return layer_path[len(prefix):].split(".", 1)[1]


def adapted_module_types(model: nn.Module) -> dict[str, ModuleType]:
    """Module types of a model that already carries RaSA layers, grouped as :func:`apply_rasa` did."""
    layers_path, _ = decoder_layers(model)
    grouped: dict[str, list] = {}
    for name, layer in rasa_layers(model).items():
        grouped.setdefault(module_type_of(name, layers_path), []).append(layer)
    return {path: ModuleType(path, group[0].in_features, group[0].out_features,
                             tuple(sorted(layer.layer_index for layer in group)),
                             getattr(group[0], "num_experts", 0))
            for path, group in grouped.items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable RaSA tensors by state-dict key (private factors, diagonals, pools once each)."""
    rasa_config_of(model)
    names = {}
    for name, module in model.named_modules():
        if isinstance(module, (*ADAPTER_UNITS, RankPool)):
            for pname, param in module.named_parameters(recurse=False):
                names[f"{name}.{pname}"] = param
    return names


def expected_adapter_shapes(layers_path: str, module_types: dict[str, ModuleType],
                            config: RaSAConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor :func:`adapter_state_dict` will hold for these module types."""
    shapes = {}
    for path, mtype in module_types.items():
        pool_rank = config.pool_rank(mtype.num_layers)
        lead = (mtype.num_experts,) if mtype.num_experts else ()
        if pool_rank:
            shapes[f"{POOLS_ATTR}.{path}.A_shared"] = (*lead, pool_rank, mtype.in_features)
            shapes[f"{POOLS_ATTR}.{path}.B_shared"] = (*lead, mtype.out_features, pool_rank)
        for index in mtype.layer_indices:
            prefix = f"{layers_path}.{index}.{path}"
            if config.private_rank:
                shapes[f"{prefix}.A_private"] = (*lead, config.private_rank, mtype.in_features)
                shapes[f"{prefix}.B_private"] = (*lead, mtype.out_features, config.private_rank)
            shapes[f"{prefix}.diag"] = (*lead, config.private_rank + pool_rank)
    return shapes


def set_adapter_merged(model: nn.Module, merged: bool) -> nn.Module:
    """Merge every ΔW into its base weight (``merged=True``) or take it out again; forward is unchanged."""
    for layer in rasa_layers(model).values():
        if merged and not layer.merged:
            layer.merge()
        elif not merged and layer.merged:
            layer.unmerge()
    return model


def merge_adapter(model: nn.Module) -> nn.Module:
    """Merge all RaSA updates into the base weights but keep the adapters (see :func:`unmerge_adapter`)."""
    rasa_config_of(model)
    return set_adapter_merged(model, True)


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapter`: subtract every ΔW from its base weight."""
    rasa_config_of(model)
    return set_adapter_merged(model, False)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every ΔW into its base weight and remove all RaSA modules: a plain transformers model."""
    rasa_config_of(model)
    set_adapter_merged(model, True)
    wrappers = [name for name, m in model.named_modules() if isinstance(m, (RaSALinear, RaSAExperts))]
    for name in wrappers:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, getattr(parent, leaf).base_layer)
    delattr(model, POOLS_ATTR)
    object.__delattr__(model, CONFIG_ATTR)
    return model
