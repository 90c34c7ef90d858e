"""Tensor-parallel RaSA around Megatron-core's ``ColumnParallelLinear`` / ``RowParallelLinear``.

Sharding (``tp`` ranks; one :class:`ShardedRaSA` per Hugging Face module type, e.g. ``q_proj``):

* column-parallel base (weight split on the output dim): ``A = [A_i ; A_S]`` replicated,
  ``B = [B_i | B_S]`` split on the output dim, ``D`` replicated;
* row-parallel base (weight split on the input dim): ``A`` split on the input dim, ``B``, ``D``
  replicated.

Communication: the frozen base weight needs no gradient, so each wrapper runs the base GEMM itself
and puts the adapter inside the base layer's own collectives, so no activation crosses the wire twice:

* column: the input is made "total" once (identity forward / all-reduce backward, or under
  sequence parallelism Megatron's all-gather forward / reduce-scatter backward) and both the base
  GEMM and the adapter's A-side read it; their input gradients are summed before that single
  all-reduce / reduce-scatter;
* row: the adapter's rank-``R`` intermediate ``h = x_shard A_shardᵀ`` is a partial sum over
  TP ranks and so is ``(h D) Bᵀ``; it is added to the base's partial output before the base's
  all-reduce (or reduce-scatter under sequence parallelism), which sums both. No collective is
  added per micro-batch.

The price: parameters read by every TP rank on the side of a partial sum get partial gradients
(column: ``A``, ``D``; row: ``B``, ``D``). They are tagged ``rasa_tp_partial_grad`` and summed
over the TP group once per optimizer step by :func:`finalize_rasa_grads` (parameter-sized, a few
MB at 70B scale, against an extra ``[tokens, R]`` all-reduce per layer and micro-batch).

Fused projections: Megatron's ``linear_qkv`` output on one TP rank is ``[groups, (heads/group + 2)
* head_dim]`` (per query group: its query heads, then its key head, then its value head) and
``linear_fc1`` with SwiGLU is ``[gate_shard | up_shard]``. The wrappers keep one adapter per HF
module (q, k, v; gate, up), compute the A-side of all of them in one GEMM, and place each output
in the fused layout, so the model equals a HF model with adapters on the 7 HF linears.
"""
from __future__ import annotations

import itertools
import re

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..functional import concat_factors, initial_diag, kaiming_init_, rasa_delta, rasa_linear
from ..layers import MergeableUpdate

COLUMN, ROW = "column", "row"
PARTIAL_GRAD_ATTR = "rasa_tp_partial_grad"


def _megatron_mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings


def check_divisible(value: int, by: int, what: str, by_what: str) -> int:
    """``value // by``, or a ValueError naming both numbers."""
    if by <= 0 or value % by:
        raise ValueError(f"{what} = {value} is not divisible by {by_what} = {by}; choose {by_what} among "
                         f"the divisors of {value}: {[d for d in range(1, value + 1) if value % d == 0]}")
    return value // by


def as_chunks(model) -> list:
    """This rank's model chunks as a list (``model``: one chunk or a list/tuple of virtual-pipeline chunks)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def shard_of(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """The ``rank``-th of ``size`` contiguous chunks of ``full`` along ``dim`` (a copy)."""
    check_divisible(full.shape[dim], size, f"dim {dim} of a {list(full.shape)} tensor", "the tensor-parallel size")
    return full.chunk(size, dim=dim)[rank].clone()


def local_shard(full: torch.Tensor, factor: str, parallel: str, tp_rank: int, tp_size: int) -> torch.Tensor:
    """This TP rank's part of a full-size factor: ``A`` is split on ``in`` (dim 1) in a row layer,
    ``B`` on ``out`` (dim 0) in a column layer; the other factor is replicated (returned as is)."""
    dim = {("A", ROW): 1, ("B", COLUMN): 0}.get((factor, parallel))
    return full if dim is None else shard_of(full, dim, tp_rank, tp_size)


def _dist_ckpt_groups(metadata):
    from megatron.core import parallel_state
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    metadata = ensure_metadata_has_dp_cp_group(metadata)
    return parallel_state.get_tensor_model_parallel_group(), metadata["dp_cp_group"], metadata


def _wrapper_sharded_state_dict(base_layer, adapter_tensors: dict, tp_axes: dict, prefix: str, sharded_offsets,
                                metadata) -> dict:
    """Dist-checkpoint entries of a RaSA wrapper: the base layer's own entries under the checkpoint
    keys a plain Megatron model uses (``...linear_qkv.weight``), plus the adapter tensors (TP-sharded
    on ``tp_axes``, replicated otherwise, with Megatron's replica ids)."""
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    tp_group, dp_cp_group, metadata = _dist_ckpt_groups(metadata)
    entries = base_layer.sharded_state_dict(prefix + "base_layer.", sharded_offsets, metadata)
    for entry in entries.values():
        if hasattr(entry, "key") and entry.key.startswith(prefix + "base_layer."):
            entry.key = prefix + entry.key[len(prefix + "base_layer."):]
    entries.update(make_sharded_tensors_for_checkpoint(adapter_tensors, prefix, tp_axes, sharded_offsets,
                                                       tp_group=tp_group, dp_cp_group=dp_cp_group))
    return entries


def _accept_plain_base_keys(wrapper: nn.Module) -> None:
    """Let ``wrapper.load_state_dict`` take a plain Megatron state dict: ``<prefix>weight`` (and the
    base layer's other own entries) load into ``<prefix>base_layer.weight``."""
    def rename(module, state_dict, prefix, *args):
        for name in list(module.base_layer.state_dict(keep_vars=True)):
            plain, wrapped = prefix + name, f"{prefix}base_layer.{name}"
            if plain in state_dict and wrapped not in state_dict:
                state_dict[wrapped] = state_dict.pop(plain)

    wrapper.register_load_state_dict_pre_hook(rename)


def _mark_partial(*params: nn.Parameter) -> None:
    for param in params:
        setattr(param, PARTIAL_GRAD_ATTR, True)


def _mark_tp_sharded(param: nn.Parameter, dim: int) -> None:
    """Megatron's tensor-parallel attributes on a TP-sharded factor, so Megatron's optimizer (gradient
    norm, distributed optimizer) counts each shard once, as it does for the base weights."""
    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _layout_free_key(key: str) -> str:
    """A pool registered on a layer (models built from ``rasa_layer_spec``) gets the key
    ``<model>.decoder.layers.[n.]rasa_pools...`` from Megatron's TransformerBlock (``n``, that rank's
    first layer, with non-homogeneous layers). The pool spans all layers and is registered on the
    model chunk by ``apply_rasa_megatron``, so both store it as ``<model>.rasa_pools...``: the key
    depends neither on the layout nor on how RaSA was put in."""
    return re.sub(r"(^|\.)decoder\.layers\.(?:\d+\.)?rasa_pools\.", r"\1rasa_pools.", key)


class ShardedRankPool(nn.Module):
    """The pool of one module type, sharded like its module over TP and by layer over PP stages.

    The full pool (paper eq. 3) is ``A_S: [L k, in]``, ``B_S: [out, L k]``, rows/columns
    ``[i k, (i+1) k)`` being the ranks layer ``i`` gave. This rank stores only the slices of the
    layers it runs (``owned_layers``), TP-sharded like its module (column: ``out / tp``; row:
    ``in / tp``):

    Attributes:
        A_shared: ``[len(owned_layers) k, in_local]`` this rank's slice (a parameter).
        B_shared: ``[out_local, len(owned_layers) k]``.
        full_A / full_B: the whole pool ``[L k, in_local]`` / ``[out_local, L k]`` while gathered
            (:func:`gather_pipeline_pools`, once per optimizer step); with one stage, the parameters.

    Initialised from the full-size init (Kaiming with the full fan-in, zeros for B) drawn from
    ``generator``, so every layout holds slices of the same pool a single process would.
    """

    def __init__(self, in_features: int, out_features: int, pool_rank: int, num_layers: int, parallel: str,
                 tp_rank: int, tp_size: int, dtype=torch.float32, generator: torch.Generator | None = None,
                 owned_layers: tuple[int, ...] | None = None):
        super().__init__()
        if parallel not in (COLUMN, ROW):
            raise ValueError(f"parallel must be {COLUMN!r} or {ROW!r}, got {parallel!r}")
        if pool_rank <= 0 or pool_rank % num_layers:
            raise ValueError(f"pool_rank = {pool_rank} must be a positive multiple of num_layers = {num_layers}")
        self.parallel, self.tp_rank, self.tp_size = parallel, tp_rank, tp_size
        self.full_in_features, self.full_out_features = in_features, out_features
        self.in_features = check_divisible(in_features, tp_size, "in_features", "tensor-parallel size") \
            if parallel == ROW else in_features
        self.out_features = check_divisible(out_features, tp_size, "out_features", "tensor-parallel size") \
            if parallel == COLUMN else out_features
        self.num_layers, self.pool_rank, self.rank_per_layer = num_layers, pool_rank, pool_rank // num_layers
        self.owned_layers = tuple(range(num_layers)) if owned_layers is None else tuple(sorted(owned_layers))
        if not self.owned_layers or not all(0 <= i < num_layers for i in self.owned_layers):
            raise ValueError(f"owned_layers {owned_layers} must be a non-empty subset of range({num_layers})")
        local_rank = len(self.owned_layers) * self.rank_per_layer
        self.A_shared = nn.Parameter(torch.empty(local_rank, self.in_features, dtype=dtype))
        self.B_shared = nn.Parameter(torch.empty(self.out_features, local_rank, dtype=dtype))
        if tp_size > 1:
            _mark_partial(self.A_shared if parallel == COLUMN else self.B_shared)
        if parallel == COLUMN:
            _mark_tp_sharded(self.B_shared, dim=0)
        else:
            _mark_tp_sharded(self.A_shared, dim=1)
        self.full_A = self.full_B = None
        self.reset_parameters(generator)

    @property
    def is_whole(self) -> bool:
        """Whether this rank owns every layer's slice (no pipeline sharding)."""
        return len(self.owned_layers) == self.num_layers

    def owned_rows(self) -> torch.Tensor:
        """Indices into the full pool's ``L k`` ranks of this rank's slice, in slice order."""
        k = self.rank_per_layer
        return torch.tensor([i * k + j for i in self.owned_layers for j in range(k)], dtype=torch.long)

    @torch.no_grad()
    def load_full_(self, A_full: torch.Tensor, B_full: torch.Tensor) -> None:
        """Copy this rank's slice of the full single-process pool ``A [Lk, in]``, ``B [out, Lk]`` in."""
        rows = self.owned_rows()
        A = A_full.index_select(0, rows)
        B = B_full.index_select(1, rows)
        self.A_shared.copy_(local_shard(A, "A", self.parallel, self.tp_rank, self.tp_size))
        self.B_shared.copy_(local_shard(B, "B", self.parallel, self.tp_rank, self.tp_size))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        full_A = torch.empty(self.pool_rank, self.full_in_features, dtype=self.A_shared.dtype)
        kaiming_init_(full_A, generator)
        self.load_full_(full_A, torch.zeros(self.full_out_features, self.pool_rank, dtype=self.B_shared.dtype))

    def pool_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A_S [Lk, in_local], B_S [out_local, Lk])`` of the whole pool, for the layers' forward."""
        if self.is_whole:
            return self.A_shared, self.B_shared
        if self.full_A is None:
            raise RuntimeError("the pipeline-sharded pool is not gathered: call gather_pipeline_pools(model) "
                               "once per optimizer step before the first forward")
        return self.full_A, self.full_B

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Dist-checkpoint entries: ``A_S`` stored as ``[L, k, in]`` and ``B_S`` as ``[L, out, k]``
        (a layer axis first, then TP sharding like the module), each rank writing the layers it owns,
        so a checkpoint written on one TP x PP (x VPP) layout loads on any other."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        _, dp_cp_group, _ = _dist_ckpt_groups(metadata)
        dp_rank = dist.get_rank(dp_cp_group)
        k, owned, num_layers = self.rank_per_layer, self.owned_layers, self.num_layers
        entries = {}
        for name, param, tp_axis, layer_dim in (("A_shared", self.A_shared, 1, 0), ("B_shared", self.B_shared, 0, 1)):
            sharded_on_tp = self.tp_size > 1 and ((name == "A_shared") == (self.parallel == ROW))
            replica = (0, 0 if sharded_on_tp else self.tp_rank, dp_rank)

            def build(key, data, replica_id, flattened_range, layer_dim=layer_dim, tp_axis=tp_axis,
                      sharded_on_tp=sharded_on_tp):
                key = _layout_free_key(key)
                if flattened_range is not None:
                    raise ValueError("RaSA pools do not support flattened (distributed-optimizer) ranges")
                offsets = [(1 + tp_axis, self.tp_rank, self.tp_size)] if sharded_on_tp else []
                return {f"layer{layer}": ShardedTensor.from_rank_offsets(
                            key, data.narrow(layer_dim, j * k, k), (0, layer, num_layers), *offsets,
                            replica_id=replica_id, prepend_axis_num=1)
                        for j, layer in enumerate(owned)}

            def merge(loaded, layer_dim=layer_dim):
                return torch.cat([loaded[f"layer{layer}"] for layer in owned], dim=layer_dim)

            entries[prefix + name] = ShardedTensorFactory(prefix + name, param, build, merge, replica)
        return entries

    def extra_repr(self) -> str:
        return (f"{self.parallel}, in_local={self.in_features}, out_local={self.out_features}, "
                f"pool_rank={self.pool_rank}, owned_layers={list(self.owned_layers)}")


class ShardedRaSA(MergeableUpdate, nn.Module):
    """One HF module's RaSA factors on one TP rank (the private part, ``D`` and a pool reference).

    Args:
        in_features, out_features: the full (unsharded) HF linear shape.
        parallel: ``"column"`` (B split on the output dim) or ``"row"`` (A split on the input dim).

    Attributes:
        A_private: column ``[r-k, in]``, row ``[r-k, in/tp]``.
        B_private: column ``[out/tp, r-k]``, row ``[out, r-k]``.
        diag: ``[r-k+Lk]`` replicated.
    """

    def __init__(self, in_features: int, out_features: int, private_rank: int, pool: ShardedRankPool | None,
                 alpha: float, parallel: str, tp_rank: int, tp_size: int, layer_index: int = 0,
                 dropout: float = 0.0, dtype=torch.float32, generator: torch.Generator | None = None):
        super().__init__()
        if private_rank == 0 and pool is None:
            raise ValueError("ShardedRaSA needs private_rank >= 1 or a pool")
        self.parallel, self.tp_rank, self.tp_size = parallel, tp_rank, tp_size
        self.in_features, self.out_features = in_features, out_features
        self.in_local = in_features // tp_size if parallel == ROW else in_features
        self.out_local = out_features // tp_size if parallel == COLUMN else out_features
        check_divisible(in_features if parallel == ROW else out_features, tp_size,
                        "in_features" if parallel == ROW else "out_features", "tensor-parallel size")
        if pool is not None and (pool.in_features, pool.out_features) != (self.in_local, self.out_local):
            raise ValueError(f"pool shard (in={pool.in_features}, out={pool.out_features}) does not match the "
                             f"adapter shard (in={self.in_local}, out={self.out_local}) of layer {layer_index}")
        object.__setattr__(self, "pool", pool)
        self.private_rank = private_rank
        self.pool_rank = 0 if pool is None else pool.pool_rank
        self.alpha, self.layer_index, self.merged = alpha, layer_index, False
        if private_rank:
            self.A_private = nn.Parameter(torch.empty(private_rank, self.in_local, dtype=dtype))
            self.B_private = nn.Parameter(torch.empty(self.out_local, private_rank, dtype=dtype))
        else:
            self.A_private = self.B_private = None
        self.diag = nn.Parameter(torch.empty(private_rank + self.pool_rank, dtype=dtype))
        replicated_partial = [self.diag] + [p for p in ((self.A_private,) if parallel == COLUMN else (self.B_private,))
                                            if p is not None]
        if tp_size > 1:
            _mark_partial(*replicated_partial)
        if private_rank and parallel == COLUMN:
            _mark_tp_sharded(self.B_private, dim=0)
        elif private_rank:
            _mark_tp_sharded(self.A_private, dim=1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "_base_weight_fn", None)
        self.reset_parameters(generator)

    @property
    def effective_rank(self) -> int:
        return self.private_rank + self.pool_rank

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.A_private is not None:
            full_A = torch.empty(self.private_rank, self.in_features, dtype=self.A_private.dtype)
            kaiming_init_(full_A, generator)
            self.A_private.copy_(self._local(full_A, "A"))
            self.B_private.zero_()
        self.diag.copy_(initial_diag(self.alpha, self.private_rank, self.pool_rank))

    def _local(self, full: torch.Tensor, factor: str) -> torch.Tensor:
        return local_shard(full, factor, self.parallel, self.tp_rank, self.tp_size)

    def factors(self):
        """``(A [R, in_local], B [out_local, R])``: private and pooled ranks concatenated."""
        A_private, B_private, A_S, B_S, _ = self.local_factors()
        return concat_factors(A_private, B_private, A_S, B_S)

    def local_factors(self):
        A_S, B_S = (None, None) if self.pool is None else self.pool.pool_factors()
        return (self.A_private, self.B_private, A_S, B_S, self.diag)

    def delta_weight(self) -> torch.Tensor:
        """This rank's ``ΔW`` shard: column ``[out/tp, in]``; row ``[out, in/tp]``."""
        return rasa_delta(*self.local_factors())

    @torch.no_grad()
    def load_full_(self, A_private, B_private, A_shared, B_shared, diag) -> None:
        """Copy this rank's slice of full-size (single-process) factors in; the pool's too
        (``A_shared``/``B_shared`` the whole single-process pool)."""
        if self.A_private is not None:
            self.A_private.copy_(self._local(A_private, "A"))
            self.B_private.copy_(self._local(B_private, "B"))
        if self.pool is not None:
            self.pool.load_full_(A_shared, B_shared)
        self.diag.copy_(diag)

    def _base_weight(self) -> torch.Tensor:
        if self._base_weight_fn is None:
            raise RuntimeError("this adapter is not attached to a base layer")
        return self._base_weight_fn()


FUSED_PARTS = {"qkv": ("q_proj", "k_proj", "v_proj"), "glu": ("gate_proj", "up_proj")}


class RaSAColumnParallelLinear(nn.Module):
    """A frozen Megatron ``ColumnParallelLinear`` plus RaSA adapters; same call/return as the base.

    Args:
        base_layer: the Megatron layer (``gather_output`` and ``skip_bias_add`` are honoured).
        adapters: ``{hf name: ShardedRaSA}`` (column). ``layout="plain"``: exactly one.
            ``layout="qkv"`` (``linear_qkv``): any of ``q_proj, k_proj, v_proj``;
            ``layout="glu"`` (SwiGLU ``linear_fc1``): any of ``gate_proj, up_proj``; parts without an
            adapter get no update.
        query_groups_local, heads_per_group, head_dim: the ``qkv`` layout on this TP rank: per query
            group, its ``heads_per_group`` query heads, then its key head, then its value head.
    """

    def __init__(self, base_layer: nn.Module, adapters: dict[str, ShardedRaSA], layout: str = "plain",
                 query_groups_local: int = 0, heads_per_group: int = 0, head_dim: int = 0):
        super().__init__()
        if layout not in ("plain", *FUSED_PARTS):
            raise ValueError(f"layout must be 'plain', 'qkv' or 'glu', got {layout!r}")
        self.layout = layout
        self.parts = FUSED_PARTS.get(layout, tuple(adapters))
        unknown = sorted(set(adapters) - set(self.parts))
        if not adapters or unknown or (layout == "plain" and len(adapters) != 1):
            raise ValueError(f"layout {layout!r} takes adapters for {list(self.parts) if layout != 'plain' else 'one module'}"
                             f", got {list(adapters)}")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict(adapters)
        _accept_plain_base_keys(self)
        self.query_groups_local, self.heads_per_group, self.head_dim = query_groups_local, heads_per_group, head_dim
        rows = base_layer.weight.shape[0]
        self.part_rows = self._part_rows(rows)
        for name, adapter in adapters.items():
            if adapter.parallel != COLUMN:
                raise ValueError("RaSAColumnParallelLinear needs column adapters")
            if adapter.out_local != self.part_rows[name]:
                raise ValueError(f"adapter {name!r} has {adapter.out_local} local output rows, the base layer's "
                                 f"{name} part has {self.part_rows[name]}")
        layer = self
        for name, adapter in adapters.items():
            def view(name=name):  # merge/unmerge write into this adapter's rows of the fused weight
                return layer.split_weight(layer.base_layer.weight)[name]
            object.__setattr__(adapter, "_base_weight_fn", view)

    def _part_rows(self, rows: int) -> dict[str, int]:
        if self.layout == "qkv":
            g, hpg, d = self.query_groups_local, self.heads_per_group, self.head_dim
            if g * (hpg + 2) * d != rows:
                raise ValueError(f"qkv layout {g} groups x ({hpg} query heads + 2) x head_dim {d} = "
                                 f"{g * (hpg + 2) * d} rows, the base layer has {rows}")
            return {"q_proj": g * hpg * d, "k_proj": g * d, "v_proj": g * d}
        if self.layout == "glu":
            if rows % 2:
                raise ValueError(f"a SwiGLU fc1 needs an even number of local rows, got {rows}")
            return {"gate_proj": rows // 2, "up_proj": rows // 2}
        return {self.parts[0]: rows}

    def split_weight(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of the local fused weight ``[rows, in]`` per HF module (q/k/v views are 3-D)."""
        if self.layout == "qkv":
            g, d, hpg = self.query_groups_local, self.head_dim, self.heads_per_group
            grouped = weight.view(g, (hpg + 2) * d, weight.shape[-1])
            return {"q_proj": grouped[:, : hpg * d], "k_proj": grouped[:, hpg * d: (hpg + 1) * d],
                    "v_proj": grouped[:, (hpg + 1) * d:]}
        if self.layout == "glu":
            gate, up = weight.chunk(2, dim=0)
            return {"gate_proj": gate, "up_proj": up}
        return {self.parts[0]: weight}

    def combine(self, outputs: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """Place per-module outputs ``[..., part_rows]`` in the fused local output ``[..., rows]``."""
        lead = like.shape[:-1]
        full = [outputs[n] if n in outputs else like.new_zeros(*lead, self.part_rows[n]) for n in self.parts]
        if self.layout != "qkv":
            return full[0] if len(full) == 1 else torch.cat(full, dim=-1)
        g, d = self.query_groups_local, self.head_dim
        q, k, v = full
        fused = torch.cat([q.reshape(*lead, g, self.heads_per_group * d), k.reshape(*lead, g, d),
                           v.reshape(*lead, g, d)], dim=-1)
        return fused.reshape(*lead, -1)

    def adapter_output(self, total_input: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Fused local adapter output ``[..., rows]`` from the total input ``[..., in]``."""
        names = list(self.adapters)
        active = [self.adapters[n] for n in names]
        factors = [a.factors() for a in active]
        x = active[0].dropout(total_input).to(active[0].diag.dtype)
        A_all = torch.cat([A for A, _ in factors], dim=0) if len(factors) > 1 else factors[0][0]
        h_all = F.linear(x, A_all)  # one GEMM for the A-sides of all adapters sharing this input
        outputs, start = {}, 0
        for name, adapter, (A, B) in zip(names, active, factors):
            h = h_all[..., start:start + A.shape[0]]
            start += A.shape[0]
            outputs[name] = F.linear(h * adapter.diag, B)
        return self.combine(outputs, like.to(h_all.dtype))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        tensors = {f"adapters.{name}.{pname}": param for name, adapter in self.adapters.items()
                   for pname, param in adapter.named_parameters(recurse=False)}
        entries = _wrapper_sharded_state_dict(self.base_layer, tensors,
                                              {f"adapters.{name}.B_private": 0 for name in self.adapters},
                                              prefix, sharded_offsets, metadata)
        if self.layout == "glu":  # what Megatron's MLP does for a plain linear_fc1: gate and up stored apart
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            for key in (f"{prefix}base_layer.weight", f"{prefix}base_layer.bias"):
                if key in entries:
                    entries[key] = apply_swiglu_sharded_factory(
                        entries[key], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        return entries

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        base, maps = self.base_layer, _megatron_mappings()
        if getattr(base, "explicit_expert_comm", False):  # MoE expert: the token dispatcher communicates
            total = input_
        elif base.sequence_parallel:
            total = maps.gather_from_sequence_parallel_region(input_, group=base.tp_group)
        else:
            total = maps.copy_to_tensor_model_parallel_region(input_, group=base.tp_group)
        bias = base.bias if not base.skip_bias_add else None
        output = F.linear(total, base.weight if weight is None else weight, bias)
        if not any(a.merged for a in self.adapters.values()):
            output = output + self.adapter_output(total, output).to(output.dtype)
        gather = base.gather_output if runtime_gather_output is None else runtime_gather_output
        if gather:
            output = maps.gather_from_tensor_model_parallel_region(output, group=base.tp_group)
        return output, (base.bias if base.skip_bias_add else None)


class RaSARowParallelLinear(nn.Module):
    """A frozen Megatron ``RowParallelLinear`` plus one RaSA adapter (row-sharded); same call/return."""

    def __init__(self, base_layer: nn.Module, adapter: ShardedRaSA):
        super().__init__()
        if adapter.parallel != ROW:
            raise ValueError("RaSARowParallelLinear needs a row adapter")
        if (adapter.out_local, adapter.in_local) != tuple(base_layer.weight.shape):
            raise ValueError(f"adapter shard [{adapter.out_local}, {adapter.in_local}] does not match the base "
                             f"weight {list(base_layer.weight.shape)}")
        self.base_layer = base_layer
        self.adapter = adapter
        _accept_plain_base_keys(self)
        layer = self
        object.__setattr__(adapter, "_base_weight_fn", lambda: layer.base_layer.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        tensors = {f"adapter.{pname}": param for pname, param in self.adapter.named_parameters(recurse=False)}
        return _wrapper_sharded_state_dict(self.base_layer, tensors, {"adapter.A_private": 1}, prefix,
                                           sharded_offsets, metadata)

    def forward(self, input_: torch.Tensor):
        base, maps = self.base_layer, _megatron_mappings()
        x = input_ if base.input_is_parallel else maps.scatter_to_tensor_model_parallel_region(input_, group=base.tp_group)
        partial = F.linear(x, base.weight)
        adapter = self.adapter
        if not adapter.merged:  # x_shard A_shardᵀ is a partial sum over TP ranks, and so is this output
            adapter_input = adapter.dropout(x).to(adapter.diag.dtype)
            partial = partial + rasa_linear(adapter_input, *adapter.local_factors()).to(partial.dtype)
        if getattr(base, "explicit_expert_comm", False):  # MoE expert: the token dispatcher reduces
            output = partial
        elif base.sequence_parallel:
            output = maps.reduce_scatter_to_sequence_parallel_region(partial, group=base.tp_group)
        else:
            output = maps.reduce_from_tensor_model_parallel_region(partial, group=base.tp_group)
        if base.skip_bias_add:
            return output, base.bias
        return (output + base.bias if base.bias is not None else output), None


def partial_grad_parameters(module) -> list[nn.Parameter]:
    """Trainable RaSA parameters whose gradient is a partial sum over the TP group, each once
    (pools included, also when the module holds only the adapters' unregistered references)."""
    seen, out = set(), []
    for root in as_chunks(module):
        pools = [m.pool.parameters() for m in root.modules() if isinstance(m, ShardedRaSA) and m.pool is not None]
        for param in itertools.chain(root.parameters(), *pools):
            if getattr(param, PARTIAL_GRAD_ATTR, False) and param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                out.append(param)
    return out


def rasa_pools_of(model) -> list[ShardedRankPool]:
    """Every pool the model chunks use, each once, in a deterministic order."""
    seen, pools = set(), []
    for root in as_chunks(model):
        for module in root.modules():
            pool = module if isinstance(module, ShardedRankPool) else getattr(module, "pool", None) \
                if isinstance(module, ShardedRaSA) else None
            if pool is not None and id(pool) not in seen:
                seen.add(id(pool))
                pools.append(pool)
    return pools


def _default_group(kind: str):
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group() if kind == "tp"
            else parallel_state.get_pipeline_model_parallel_group())


def _owners(pools: list[ShardedRankPool], pp_group) -> list[tuple[int, ...]]:
    """Owned layers of every PP rank (exchanged once, then cached on the first pool)."""
    cached = getattr(pools[0], "_pp_owners", None)
    if cached is None:
        cached = [None] * dist.get_world_size(pp_group)
        dist.all_gather_object(cached, pools[0].owned_layers, group=pp_group)
        if any(len(o) != len(cached[0]) for o in cached):
            raise ValueError(f"pipeline stages own different numbers of layers {[len(o) for o in cached]}; "
                             "the pool all-gather needs equal slices (choose a pipeline size dividing the layers)")
        for pool in pools:
            pool._pp_owners = cached
    return cached


def _pool_rows(layers: tuple[int, ...], k: int) -> torch.Tensor:
    return torch.tensor([i * k + j for i in layers for j in range(k)], dtype=torch.long)


def gather_pipeline_pools(model, pp_group=None) -> int:
    """All-gather every pipeline-sharded pool over the PP group into its ``full_A`` / ``full_B``
    (leaf tensors that collect the full-pool gradient of this stage's micro-batches).

    Call once per optimizer step, before the first forward (the weights do not change between
    micro-batches). One coalesced all-gather for all pools. Returns the number of collectives (0/1).
    """
    check_megatron_ddp(model)
    pools = [p for p in rasa_pools_of(model) if not p.is_whole]
    if not pools:
        return 0
    pp_group = pp_group if pp_group is not None else _default_group("pp")
    owners = _owners(pools, pp_group)
    with torch.no_grad():
        local = torch.cat([t.detach().reshape(-1) for p in pools for t in (p.A_shared, p.B_shared)])
        gathered = [torch.empty_like(local) for _ in owners]
        dist.all_gather(gathered, local, group=pp_group)
        fulls = [(torch.empty(p.pool_rank, p.in_features, dtype=p.A_shared.dtype, device=local.device),
                  torch.empty(p.out_features, p.pool_rank, dtype=p.B_shared.dtype, device=local.device))
                 for p in pools]
        for layers, flat in zip(owners, gathered):
            offset = 0
            for pool, (full_A, full_B) in zip(pools, fulls):
                rows = _pool_rows(layers, pool.rank_per_layer).to(local.device)
                A = flat[offset: offset + pool.A_shared.numel()].view_as(pool.A_shared)
                offset += pool.A_shared.numel()
                B = flat[offset: offset + pool.B_shared.numel()].view_as(pool.B_shared)
                offset += pool.B_shared.numel()
                full_A.index_copy_(0, rows, A)
                full_B.index_copy_(1, rows, B)
    for pool, (full_A, full_B) in zip(pools, fulls):
        pool.full_A, pool.full_B = full_A.requires_grad_(True), full_B.requires_grad_(True)
    return 1


def _accumulate_grad(param: nn.Parameter, grad: torch.Tensor) -> None:
    target = getattr(param, "main_grad", None)
    if target is not None:
        target.add_(grad.to(target.dtype))
    elif param.grad is None:
        param.grad = grad.to(param.dtype).clone()
    else:
        param.grad.add_(grad.to(param.grad.dtype))


def reduce_scatter_pipeline_pool_grads(model, pp_group=None) -> int:
    """Sum the full-pool gradients over the PP group and give every stage the sum for its own
    slices (one reduce-scatter for all pools; on gloo, which has none, an all-reduce and a slice).
    Adds into ``main_grad`` (Megatron DDP) or ``.grad``; releases the gathered pools."""
    pools = [p for p in rasa_pools_of(model) if not p.is_whole and p.full_A is not None]
    if not pools:
        return 0
    pp_group = pp_group if pp_group is not None else _default_group("pp")
    owners = _owners(pools, pp_group)
    me = dist.get_rank(pp_group)
    with torch.no_grad():
        chunks = []
        for layers in owners:
            for pool in pools:
                rows = _pool_rows(layers, pool.rank_per_layer).to(pool.full_A.device)
                gA = pool.full_A.grad if pool.full_A.grad is not None else torch.zeros_like(pool.full_A)
                gB = pool.full_B.grad if pool.full_B.grad is not None else torch.zeros_like(pool.full_B)
                chunks += [gA.index_select(0, rows).reshape(-1), gB.index_select(1, rows).reshape(-1)]
        send = torch.cat(chunks)
        per_rank = send.numel() // len(owners)
        if dist.get_backend(pp_group) == "gloo":
            dist.all_reduce(send, group=pp_group)
            mine = send[me * per_rank: (me + 1) * per_rank]
        else:
            mine = torch.empty(per_rank, dtype=send.dtype, device=send.device)
            dist.reduce_scatter_tensor(mine, send, group=pp_group)
        offset = 0
        for pool in pools:
            for param in (pool.A_shared, pool.B_shared):
                _accumulate_grad(param, mine[offset: offset + param.numel()].view_as(param))
                offset += param.numel()
            pool.full_A = pool.full_B = None
    return 1


def finalize_rasa_grads(model, tp_group=None, pp_group=None) -> dict[str, int]:
    """Finish the RaSA gradients of one optimizer step, in one place; call after the backward passes
    of all micro-batches and before Megatron's ``finalize_model_grads`` (which then averages over
    data-parallel replicas as for any parameter):

    1. pipeline-sharded pools: one reduce-scatter over the PP group turns each stage's full-pool
       gradient into the summed gradient of its own slices;
    2. parameters with TP-partial gradients (``rasa_tp_partial_grad``): one coalesced all-reduce
       over the TP group.

    Reads/writes ``param.main_grad`` when Megatron's DDP gave one, else ``param.grad``. Returns the
    number of collectives issued, ``{"pp_reduce_scatter": 0|1, "tp_all_reduce": 0|1}``.
    """
    counts = {"pp_reduce_scatter": reduce_scatter_pipeline_pool_grads(model, pp_group), "tp_all_reduce": 0}
    tp_group = tp_group if tp_group is not None else _default_group("tp")
    if dist.get_world_size(tp_group) == 1:
        return counts
    grads = []
    for param in partial_grad_parameters(model):
        grad = getattr(param, "main_grad", None)
        grad = param.grad if grad is None else grad
        if grad is not None:
            grads.append(grad)
    counts["tp_all_reduce"] = all_reduce_coalesced(grads, tp_group)
    return counts


def all_reduce_coalesced(grads: list[torch.Tensor], group, divide_by: int = 1) -> int:
    """Sum ``grads`` over ``group`` in one flat all-reduce (then divide by ``divide_by``), in place.
    Returns the number of collectives issued (0 when there is nothing to reduce)."""
    if not grads:
        return 0
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    if divide_by != 1:
        flat /= divide_by
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
    return 1


def finalize_model_grads_with_rasa(model, *args, **kwargs):
    """Megatron's ``finalize_model_grads`` preceded by :func:`finalize_rasa_grads`; set it as
    ``config.finalize_model_grads_func`` so Megatron's schedules finish RaSA gradients too (the RaSA
    step writes into ``main_grad`` before Megatron's data-parallel reduction reads it)."""
    from megatron.core.distributed import finalize_model_grads

    check_megatron_ddp(model)
    finalize_rasa_grads(model)
    return finalize_model_grads(model, *args, **kwargs)


def check_megatron_ddp(model) -> None:
    """Refuse Megatron DDP settings under which RaSA's gradient/pool steps would race Megatron's:

    * ``overlap_grad_reduce``: a bucket's data-parallel reduction starts from autograd hooks, but
      pool and TP-partial gradients are completed later, by :func:`finalize_rasa_grads` (and pool
      parameters get no autograd hook at all: their gradient arrives through the gathered pool);
    * ``overlap_param_gather``: the distributed optimizer's parameter all-gather is finished in
      forward pre-hooks, which never run for the pool modules whose slices
      :func:`gather_pipeline_pools` reads before the first forward.
    RaSA's gradients are ~1% of the model's; their non-overlapped reduction is cheap.
    """
    for chunk in as_chunks(model):
        ddp_config = getattr(chunk, "ddp_config", None)
        for flag in ("overlap_grad_reduce", "overlap_param_gather"):
            if ddp_config is not None and getattr(ddp_config, flag, False):
                raise ValueError(f"DistributedDataParallelConfig({flag}=True) is not supported with RaSA adapters "
                                 f"(see rasa_megatron.megatron.check_megatron_ddp); set {flag}=False")
