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

from dataclasses import dataclass

import torch
from torch import nn

from ..config import RaSAConfig
from ..functional import kaiming_init_
from .layers import RaSAColumnParallelLinear, RaSARowParallelLinear, ShardedRaSA
from .pools import ShardedRankPool
from .sharding import COLUMN, ROW, as_chunks


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
#: HF stacked expert weight -> (Megatron linear inside each local expert, sharding)
EXPERT_TYPES = {"mlp.experts.gate_up_proj": ("linear_fc1", COLUMN), "mlp.experts.down_proj": ("linear_fc2", ROW)}
EXPERT_POOLS = "mlp_experts"


def _module_shapes(config) -> dict[str, tuple[int, int]]:
    """HF module type -> (in_features, out_features) of one linear / one expert, from a TransformerConfig."""
    h, d = config.hidden_size, config.kv_channels
    q_out, kv_out = config.num_attention_heads * d, (config.num_query_groups or config.num_attention_heads) * d
    ffn = config.ffn_hidden_size
    moe_ffn = getattr(config, "moe_ffn_hidden_size", None) or ffn
    return {"self_attn.q_proj": (h, q_out), "self_attn.k_proj": (h, kv_out), "self_attn.v_proj": (h, kv_out),
            "self_attn.o_proj": (q_out, h), "mlp.gate_proj": (h, ffn), "mlp.up_proj": (h, ffn),
            "mlp.down_proj": (ffn, h), "mlp.experts.gate_up_proj": (h, 2 * moe_ffn),
            "mlp.experts.down_proj": (moe_ffn, h)}


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


def hf_module_types(config: RaSAConfig) -> tuple[list[str], list[str]]:
    """(dense HF module types, stacked-expert HF types) targeted by ``config``, in apply_rasa's order."""
    leaves = {path.rsplit(".", 1)[1]: path for path in MODULE_TYPES}
    unknown = sorted(set(config.target_modules) - set(leaves))
    if unknown:
        raise ValueError(f"unknown target module(s) {unknown} for a Megatron GPT model; valid names are "
                         f"{sorted(leaves)} (the Hugging Face names of the linears inside linear_qkv, linear_proj, "
                         "linear_fc1 and linear_fc2)")
    experts = []
    for target in config.target_parameters:
        hits = [p for p in EXPERT_TYPES if p == target or p.endswith("." + target)]
        if not hits:
            raise ValueError(f"unknown target parameter {target!r} for a Megatron MoE model; valid names are "
                             f"{sorted(EXPERT_TYPES)}")
        experts += hits
    return ([path for path in MODULE_TYPES if path.rsplit(".", 1)[1] in config.target_modules],
            [path for path in EXPERT_TYPES if path in experts])


@dataclass
class DrawnAdapters:
    """One rank's RaSA tensors for the layers it runs, before they are attached to the layers."""
    types: list[str]  # dense HF module types targeted
    expert_types: list[str]  # stacked-expert HF types targeted
    local_experts: range  # global indices of this EP rank's experts
    pools: dict[str, ShardedRankPool | None]
    expert_pools: dict[tuple[str, int], ShardedRankPool]
    adapters: dict[tuple, ShardedRaSA]  # (layer, type) or (layer, type, expert)

    def registry(self) -> RaSAPools:
        """The pools as ``rasa_pools.<self_attn|mlp|mlp_experts>.<name>`` (registered once per rank)."""
        registry = RaSAPools()
        for path, pool in self.pools.items():
            if pool is None:
                continue
            group, leaf = path.split(".")
            if group not in registry:
                registry[group] = nn.ModuleDict()
            registry[group][leaf] = pool
        if self.expert_pools:
            registry[EXPERT_POOLS] = nn.ModuleDict({f"{path.rsplit('.', 1)[1]}_{e}": pool
                                                    for (path, e), pool in self.expert_pools.items()})
        return registry


def draw_adapters(config: RaSAConfig, tconfig, owned_layers, adapter_dtype: torch.dtype = torch.float32,
                  generator: torch.Generator | None = None) -> DrawnAdapters:
    """This rank's pools and adapters for ``owned_layers`` (global indices), TP/EP-sharded.

    Every full-size tensor is drawn in the order :func:`rasa_megatron.apply_rasa` draws them (pools
    in module-type order, then each module type's layers in order, experts in expert order) from
    ``generator`` (default: the global torch RNG); this rank keeps its slices, so the adapter does
    not depend on the layout. Requires ``megatron.core.parallel_state`` to be initialised.
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    types, expert_types = hf_module_types(config)
    num_layers = tconfig.num_layers
    owned = tuple(sorted(owned_layers))
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    shapes = _module_shapes(tconfig)
    num_experts = getattr(tconfig, "num_moe_experts", None) or 0
    if expert_types and not num_experts:
        raise ValueError(f"target_parameters {list(config.target_parameters)} need a MoE model (num_moe_experts)")
    local_experts: range = range(0)
    if expert_types:
        if parallel_state.get_expert_tensor_parallel_world_size() != 1:
            raise ValueError("RaSA on experts supports expert tensor-parallel size 1 (experts split by expert "
                             f"parallelism), got {parallel_state.get_expert_tensor_parallel_world_size()}")
        ep_size = parallel_state.get_expert_model_parallel_world_size()
        per_rank = num_experts // ep_size
        local_experts = range(parallel_state.get_expert_model_parallel_rank() * per_rank,
                              (parallel_state.get_expert_model_parallel_rank() + 1) * per_rank)

    def pool_for(path, parallel, keep=True, tp=(tp_rank, tp_size)):
        in_f, out_f = shapes[path]
        if not keep:  # draw and drop, so the RNG stream does not depend on the layout
            kaiming_init_(torch.empty(config.pool_rank(num_layers), in_f, dtype=adapter_dtype), generator)
            return None
        return ShardedRankPool(in_f, out_f, config.pool_rank(num_layers), num_layers, parallel, *tp,
                               dtype=adapter_dtype, generator=generator, owned_layers=owned)

    # 1. pools in apply_rasa's order: dense types, then expert types (one pool per expert index)
    pools: dict[str, ShardedRankPool | None] = {}
    expert_pools: dict[tuple[str, int], ShardedRankPool] = {}
    for path in types:
        pools[path] = pool_for(path, MODULE_TYPES[path][1]) if config.k else None
    for path in expert_types:
        for e in range(num_experts):
            pool = pool_for(path, EXPERT_TYPES[path][1], e in local_experts, (0, 1)) if config.k else None
            if pool is not None:
                expert_pools[(path, e)] = pool

    # 2. private factors: each module type's layers in order (experts in expert order per layer)
    def skip_private(in_f):
        if config.private_rank:
            kaiming_init_(torch.empty(config.private_rank, in_f, dtype=adapter_dtype), generator)

    adapters: dict[tuple, ShardedRaSA] = {}
    for path in types + expert_types:
        in_f, out_f = shapes[path]
        expert = path in EXPERT_TYPES
        parallel = (EXPERT_TYPES if expert else MODULE_TYPES)[path][1]
        for index in range(num_layers):
            for e in (range(num_experts) if expert else [None]):
                if index not in owned or (expert and e not in local_experts):
                    skip_private(in_f)
                    continue
                pool = expert_pools.get((path, e)) if expert else pools[path]
                key = (index, path) if e is None else (index, path, e)
                adapters[key] = ShardedRaSA(in_f, out_f, config.private_rank, pool, config.alpha, parallel,
                                            *((0, 1) if expert else (tp_rank, tp_size)), layer_index=index,
                                            dropout=config.dropout, dtype=adapter_dtype, generator=generator)
                adapters[key].expert_index = e
    # Megatron's marks for expert parameters: ``allreduce = False`` makes its DDP reduce them over the
    # expert-data-parallel group (the ranks holding the same experts), not over all data-parallel
    # ranks; and with expert TP 1 no expert parameter is a duplicate of another TP rank's, so each is
    # ``tensor_model_parallel`` (as Megatron's expert weights are), else Megatron's optimizers would
    # drop the replicated factors (A, D) of dense-TP ranks > 0 from the gradient norm
    expert_params = [p for key, adapter in adapters.items() if len(key) == 3 for p in adapter.parameters()]
    expert_params += [p for pool in expert_pools.values() for p in pool.parameters()]
    for param in expert_params:
        param.allreduce = False
        if not getattr(param, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
    return DrawnAdapters(types, expert_types, local_experts, pools, expert_pools, adapters)


def attach_adapters(layer: nn.Module, index: int, drawn: DrawnAdapters) -> None:
    """Wrap the target linears of one Megatron ``TransformerLayer`` (global index ``index``) with
    its adapters from ``drawn``, in place (the caller has run :func:`check_layer_linears`)."""
    from megatron.core import parallel_state

    tconfig = layer.config
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    groups = tconfig.num_query_groups or tconfig.num_attention_heads
    by_linear: dict[str, dict[str, ShardedRaSA]] = {}
    for path in drawn.types:
        by_linear.setdefault(MODULE_TYPES[path][0], {})[path.rsplit(".", 1)[1]] = drawn.adapters[(index, path)]
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
    if drawn.expert_types:
        for j, expert_mlp in enumerate(layer.mlp.experts.local_experts):
            e = drawn.local_experts[j]
            for path in drawn.expert_types:
                linear_name, parallel = EXPERT_TYPES[path]
                base = getattr(expert_mlp, linear_name)
                adapter = drawn.adapters[(index, path, e)]
                wrapped = (RaSAColumnParallelLinear(base, {path.rsplit(".", 1)[1]: adapter}, "plain")
                           if parallel == COLUMN else RaSARowParallelLinear(base, adapter))
                setattr(expert_mlp, linear_name, wrapped)


def is_local_linear(module_class: type) -> bool:
    """Whether RaSA's wrappers can run this base linear: Megatron-core's local Column/RowParallelLinear
    (the wrappers run their base GEMM themselves; Transformer Engine linears are not supported)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    return isinstance(module_class, type) and issubclass(module_class, (ColumnParallelLinear, RowParallelLinear))


def not_local_linear_error(where: str, what: str) -> TypeError:
    return TypeError(f"{where} is {what}; RaSA wraps Megatron-core's local ColumnParallelLinear / RowParallelLinear "
                     "(use the local spec, e.g. get_gpt_layer_local_spec; Transformer Engine linears are not "
                     "supported)")


def check_layer_linears(layer: nn.Module, index: int, types: list[str], expert_types: list[str]) -> None:
    """Refuse a layer whose target linears are not Megatron-core's local Column/RowParallelLinear
    or whose experts are not a SequentialMLP."""
    def check(base, where):
        if not is_local_linear(type(base)):
            raise not_local_linear_error(where, f"a {type(base).__module__}.{type(base).__name__}")

    for linear_path in dict.fromkeys(MODULE_TYPES[path][0] for path in types):
        check(layer.get_submodule(linear_path), f"layer {index} {linear_path}")
    if expert_types:
        local = getattr(getattr(layer.mlp, "experts", None), "local_experts", None)
        if local is None:
            raise ValueError(f"layer {index} has no mlp.experts.local_experts (Megatron SequentialMLP); RaSA on "
                             "experts supports the sequential experts of the local spec")
        for expert_mlp in local:
            for path in expert_types:
                check(getattr(expert_mlp, EXPERT_TYPES[path][0]), f"layer {index} expert {EXPERT_TYPES[path][0]}")


def _embedding_output_requires_grad(module, inputs, output):
    return output.requires_grad_(True) if not output.requires_grad else output


def make_decoder_input_require_grad(model_chunks) -> None:
    """Make the frozen embedding's output require grad (a forward hook, once per chunk that has one).

    With the embedding frozen, the hidden states entering the first decoder layer of pipeline stage 0
    do not require grad; Megatron's re-entrant activation checkpointing (``CheckpointFunction``, a
    ``torch.autograd.Function``) then returns outputs without ``grad_fn`` and the checkpointed layers'
    adapters would get no gradient (PEFT's ``enable_input_require_grads`` for the same reason)."""
    for chunk in as_chunks(model_chunks):
        embedding = getattr(chunk, "embedding", None)
        if embedding is not None and not getattr(embedding, "_rasa_output_requires_grad", False):
            embedding.register_forward_hook(_embedding_output_requires_grad)
            embedding._rasa_output_requires_grad = True


def freeze_base_parameters(model_chunks) -> None:
    """Freeze every parameter of the model chunks except the RaSA adapters and pools (for models
    built from :func:`rasa_megatron.megatron.rasa_layer_spec`, whose embedding, final norm and
    output layer GPTModel builds outside the layer spec), and let activation checkpointing see the
    frozen embedding's output as requiring grad (:func:`make_decoder_input_require_grad`)."""
    chunks = as_chunks(model_chunks)
    rasa = {id(p) for chunk in chunks for m in chunk.modules() if isinstance(m, (ShardedRaSA, ShardedRankPool))
            for p in m.parameters()}
    for chunk in chunks:
        for param in chunk.parameters():
            if id(param) not in rasa:
                param.requires_grad_(False)
    make_decoder_input_require_grad(chunks)


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
    chunks = as_chunks(model_chunks)
    if any(isinstance(m, ShardedRaSA) for c in chunks for m in c.modules()):
        raise ValueError("the model already has RaSA adapters")
    types, expert_types = hf_module_types(config)  # bad targets and layers fail before anything is changed
    layers = transformer_layers(chunks)
    for index, layer in layers.items():
        check_layer_linears(layer, index, types, expert_types)
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
    make_decoder_input_require_grad(chunks)
    drawn = draw_adapters(config, chunks[0].config, layers, adapter_dtype, generator)
    for index, layer in layers.items():
        attach_adapters(layer, index, drawn)
    setattr(chunks[0], POOLS_ATTR, drawn.registry())
    return chunks


def megatron_rasa_units(model_chunks) -> dict[tuple[int, str], ShardedRaSA]:
    """``(global layer index, HF module type) -> ShardedRaSA`` of this rank; experts keyed
    ``(layer, "mlp.experts.gate_up_proj", global expert index)``."""
    chunks = as_chunks(model_chunks)
    units = {}
    for index, layer in transformer_layers(chunks).items():
        for path, (linear_path, _) in MODULE_TYPES.items():
            try:
                wrapper = layer.get_submodule(linear_path)
            except AttributeError:  # a MoE layer has no dense linear_fc1/linear_fc2
                continue
            leaf = path.rsplit(".", 1)[1]
            if isinstance(wrapper, RaSAColumnParallelLinear) and leaf in wrapper.adapters:
                units[(index, path)] = wrapper.adapters[leaf]
            elif isinstance(wrapper, RaSARowParallelLinear):  # linear_proj / linear_fc2: one module each
                units[(index, path)] = wrapper.adapter
        local = getattr(getattr(getattr(layer, "mlp", None), "experts", None), "local_experts", None)
        for expert_mlp in local or []:
            for path, (linear_name, _) in EXPERT_TYPES.items():
                wrapper = getattr(expert_mlp, linear_name)
                adapter = (next(iter(wrapper.adapters.values())) if isinstance(wrapper, RaSAColumnParallelLinear)
                           else wrapper.adapter if isinstance(wrapper, RaSARowParallelLinear) else None)
                if adapter is not None:
                    units[(index, path, adapter.expert_index)] = adapter
    return units
