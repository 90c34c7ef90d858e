"""Put RaSA into built Megatron-core GPT models (post-build transform), on any TP x PP (x VPP) layout.

Module types carry the Hugging Face names (``self_attn.q_proj`` ... ``mlp.down_proj``) so a
Megatron model with RaSA equals the HF model with RaSA on the 7 linears: ``linear_qkv`` holds the
q, k and v adapters, ``linear_fc1`` the gate and up ones. Each pool is registered once per rank,
on the first model chunk (``rasa_pools.<hf path>``), holding only the slices of the layers this
pipeline rank runs (see :class:`ShardedRankPool`).

Initialisation draws every full-size tensor in the order :func:`rasa_megatron.apply_rasa` draws
them (pools in module-type order, then each module type's layers in order) from the global torch
RNG, and each rank keeps its slices: after the same ``torch.manual_seed`` a Megatron model adapted
on any layout holds exactly the adapter a single-process HF model would.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import RaSAConfig
from ..functional import kaiming_init_
from .parallel_layers import (COLUMN, ROW, RaSAColumnParallelLinear, RaSARowParallelLinear, ShardedRankPool,
                              ShardedRaSA)

class RaSAPools(nn.ModuleDict):
    """``rasa_pools.<self_attn|mlp>.<hf name>``: the pools of this rank, with dist-checkpoint entries."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        entries = {}
        for group, pools in self.items():
            for name, pool in pools.items():
                entries.update(pool.sharded_state_dict(f"{prefix}{group}.{name}.", sharded_offsets, metadata))
        return entries


#: HF module type -> (Megatron submodule path inside a TransformerLayer, sharding)
MODULE_TYPES = {
    "self_attn.q_proj": ("self_attention.linear_qkv", COLUMN),
    "self_attn.k_proj": ("self_attention.linear_qkv", COLUMN),
    "self_attn.v_proj": ("self_attention.linear_qkv", COLUMN),
    "self_attn.o_proj": ("self_attention.linear_proj", ROW),
    "mlp.gate_proj": ("mlp.linear_fc1", COLUMN),
    "mlp.up_proj": ("mlp.linear_fc1", COLUMN),
    "mlp.down_proj": ("mlp.linear_fc2", ROW),
}
POOLS_ATTR = "rasa_pools"


def _module_shapes(config) -> dict[str, tuple[int, int]]:
    """HF module type -> (in_features, out_features) from a Megatron TransformerConfig."""
    h, d = config.hidden_size, config.kv_channels
    q_out, kv_out = config.num_attention_heads * d, (config.num_query_groups or config.num_attention_heads) * d
    ffn = config.ffn_hidden_size
    return {"self_attn.q_proj": (h, q_out), "self_attn.k_proj": (h, kv_out), "self_attn.v_proj": (h, kv_out),
            "self_attn.o_proj": (q_out, h), "mlp.gate_proj": (h, ffn), "mlp.up_proj": (h, ffn),
            "mlp.down_proj": (ffn, h)}


def transformer_layers(model_chunks) -> dict[int, nn.Module]:
    """Global (0-based) layer index -> TransformerLayer over all model chunks of this rank."""
    found = {}
    for chunk in model_chunks:
        decoder = getattr(chunk, "decoder", None)
        for layer in getattr(decoder, "layers", []):
            found[layer.layer_number - 1] = layer
    if not found:
        raise ValueError("no Megatron TransformerLayers found (expected model.decoder.layers on a GPTModel)")
    return found


def _hf_types(config: RaSAConfig) -> list[str]:
    leaves = {path.rsplit(".", 1)[1]: path for path in MODULE_TYPES}
    unknown = sorted(set(config.target_modules) - set(leaves))
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown} for a Megatron GPT model; valid names are "
                         f"{sorted(leaves)} (the Hugging Face names of the linears inside linear_qkv, linear_proj, "
                         "linear_fc1 and linear_fc2)")
    if config.target_parameters:
        raise ValueError(f"target_parameters {list(config.target_parameters)} (MoE experts) are not supported by "
                         "apply_rasa_megatron yet")
    return [path for path in MODULE_TYPES if path.rsplit(".", 1)[1] in config.target_modules]


def apply_rasa_megatron(model_chunks, config: RaSAConfig, adapter_dtype: torch.dtype = torch.float32,
                        generator: torch.Generator | None = None) -> list:
    """Wrap the target linears of built Megatron GPT model chunks (this rank's) with RaSA, in place.

    Base parameters are frozen. Requires ``megatron.core.parallel_state`` to be initialised.

    Args:
        model_chunks: a GPTModel or this rank's list of virtual-pipeline chunks.
        config: the :class:`RaSAConfig` (``target_modules`` with HF names: ``q_proj`` ... ``down_proj``).
        generator: RNG for the init (default: the global torch RNG, as ``apply_rasa``).

    Returns:
        The list of model chunks.
    """
    from megatron.core import parallel_state

    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    if any(getattr(c, POOLS_ATTR, None) is not None for c in chunks):
        raise ValueError("the model already has RaSA adapters")
    types = _hf_types(config)
    tconfig = chunks[0].config
    num_layers = tconfig.num_layers
    layers = transformer_layers(chunks)
    owned = tuple(sorted(layers))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shapes = _module_shapes(tconfig)
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)

    pools: dict[str, ShardedRankPool | None] = {}
    for path in types:
        in_f, out_f = shapes[path]
        pools[path] = ShardedRankPool(in_f, out_f, config.pool_rank(num_layers), num_layers, MODULE_TYPES[path][1],
                                      tp_rank, tp_size, dtype=adapter_dtype, generator=generator,
                                      owned_layers=owned) if config.k else None
    adapters: dict[tuple[int, str], ShardedRaSA] = {}
    for path in types:
        in_f, out_f = shapes[path]
        for index in range(num_layers):
            if index not in layers:  # keep the RNG stream layout-independent
                if config.private_rank:
                    kaiming_init_(torch.empty(config.private_rank, in_f, dtype=adapter_dtype), generator)
                continue
            adapters[(index, path)] = ShardedRaSA(in_f, out_f, config.private_rank, pools[path], config.alpha,
                                                  MODULE_TYPES[path][1], tp_rank, tp_size, layer_index=index,
                                                  dropout=config.dropout, dtype=adapter_dtype, generator=generator)

    groups = tconfig.num_query_groups or tconfig.num_attention_heads
    for index, layer in layers.items():
        by_linear: dict[str, dict[str, ShardedRaSA]] = {}
        for path in types:
            by_linear.setdefault(MODULE_TYPES[path][0], {})[path.rsplit(".", 1)[1]] = adapters[(index, path)]
        for linear_path, named in by_linear.items():
            parent_path, _, leaf = linear_path.rpartition(".")
            parent = layer.get_submodule(parent_path)
            base = getattr(parent, leaf)
            if leaf == "linear_qkv":
                wrapped = RaSAColumnParallelLinear(base, named, "qkv", groups // tp_size,
                                                   tconfig.num_attention_heads // groups, tconfig.kv_channels)
            elif leaf == "linear_fc1":
                if not tconfig.gated_linear_unit:
                    raise ValueError("gate_proj/up_proj adapters need a gated (SwiGLU) linear_fc1")
                wrapped = RaSAColumnParallelLinear(base, named, "glu")
            else:
                (adapter,) = named.values()
                wrapped = RaSARowParallelLinear(base, adapter)
            setattr(parent, leaf, wrapped)

    registry = RaSAPools()
    for path, pool in pools.items():
        if pool is None:
            continue
        group, leaf = path.split(".")
        if group not in registry:
            registry[group] = nn.ModuleDict()
        registry[group][leaf] = pool
    setattr(chunks[0], POOLS_ATTR, registry)
    for chunk in chunks:
        object.__setattr__(chunk, "rasa_config", config)
    return chunks


def megatron_rasa_units(model_chunks) -> dict[tuple[int, str], ShardedRaSA]:
    """``(global layer index, HF module type) -> ShardedRaSA`` of this rank."""
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    units = {}
    for index, layer in transformer_layers(chunks).items():
        for path, (linear_path, _) in MODULE_TYPES.items():
            wrapper = layer.get_submodule(linear_path)
            leaf = path.rsplit(".", 1)[1]
            if isinstance(wrapper, RaSAColumnParallelLinear) and leaf in wrapper.adapters:
                units[(index, path)] = wrapper.adapters[leaf]
            elif isinstance(wrapper, RaSARowParallelLinear):  # linear_proj / linear_fc2: one module each
                units[(index, path)] = wrapper.adapter
    return units


def load_hf_adapter_(model_chunks, hf_adapter: dict[str, torch.Tensor], layers_path: str = "model.layers") -> None:
    """Copy this rank's slices of a single-process HF RaSA adapter (``adapter_state_dict`` keys:
    ``model.layers.{i}.self_attn.q_proj.A_private``, ``rasa_pools.self_attn.q_proj.A_shared``, ...) in."""
    for (index, path), unit in megatron_rasa_units(model_chunks).items():
        prefix = f"{layers_path}.{index}.{path}"
        pool = f"rasa_pools.{path}"
        unit.load_full_(hf_adapter.get(f"{prefix}.A_private"), hf_adapter.get(f"{prefix}.B_private"),
                        hf_adapter.get(f"{pool}.A_shared"), hf_adapter.get(f"{pool}.B_shared"),
                        hf_adapter[f"{prefix}.diag"])
