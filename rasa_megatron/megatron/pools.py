"""RaSA pools sharded across pipeline stages (paper eq. 3) and their once-per-step collectives.

Each PP rank owns the ``k`` ranks of its own layers (its parameters, optimizer state and checkpoint
entries): :class:`ShardedRankPool`. :func:`gather_pipeline_pools` all-gathers every pool over the PP
group once per optimizer step into leaf tensors that accumulate the full-pool gradient over the
micro-batches; :func:`reduce_scatter_pipeline_pool_grads` returns to every stage the summed gradient
of its slices with one reduce-scatter.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..functional import kaiming_init_
from ..parallel_layout import check_divisible
from .ddp import check_megatron_ddp
from .sharding import (COLUMN, ROW, default_group, dist_ckpt_groups, layout_free_key, mark_partial_grad,
                       mark_tp_sharded, as_chunks, local_shard)


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
            mark_partial_grad(self.A_shared if parallel == COLUMN else self.B_shared)
        if parallel == COLUMN:
            mark_tp_sharded(self.B_shared, dim=0)
        else:
            mark_tp_sharded(self.A_shared, dim=1)
        self.full_A = self.full_B = None
        self._gathered_versions = None
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
        if self._gathered_versions != (self.A_shared._version, self.B_shared._version):
            raise RuntimeError("the gathered pipeline pool is stale: its slices changed (an optimizer step) "
                               "after gather_pipeline_pools without finalize_model_grads_with_rasa; use it as "
                               "config.finalize_model_grads_func and gather once per step")
        return self.full_A, self.full_B

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """Dist-checkpoint entries: ``A_S`` stored as ``[L, k, in]`` and ``B_S`` as ``[L, out, k]``
        (a layer axis first, then TP sharding like the module), each rank writing the layers it owns,
        so a checkpoint written on one TP x PP (x VPP) layout loads on any other."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

        if getattr(self.A_shared, "allreduce", True) is False:  # an expert pool: replicated over the ranks
            from megatron.core import parallel_state  # holding the same experts (as Megatron's SequentialMLP)

            dp_rank = parallel_state.get_expert_data_parallel_rank()
        else:
            _, dp_cp_group, _ = dist_ckpt_groups(metadata)
            dp_rank = dist.get_rank(dp_cp_group)
        k, owned, num_layers = self.rank_per_layer, self.owned_layers, self.num_layers
        entries = {}
        for name, param, tp_axis, layer_dim in (("A_shared", self.A_shared, 1, 0), ("B_shared", self.B_shared, 0, 1)):
            sharded_on_tp = self.tp_size > 1 and ((name == "A_shared") == (self.parallel == ROW))
            replica = (0, 0 if sharded_on_tp else self.tp_rank, dp_rank)

            def build(key, data, replica_id, flattened_range, layer_dim=layer_dim, tp_axis=tp_axis,
                      sharded_on_tp=sharded_on_tp):
                key = layout_free_key(key)
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



def rasa_pools_of(model) -> list[ShardedRankPool]:
    """Every pool the model chunks use, each once, in a deterministic order (registered pools and the
    pools referenced by adapters, ``module.pool``)."""
    seen, pools = set(), []
    for root in as_chunks(model):
        for module in root.modules():
            pool = module if isinstance(module, ShardedRankPool) else getattr(module, "pool", None)
            if isinstance(pool, ShardedRankPool) and id(pool) not in seen:
                seen.add(id(pool))
                pools.append(pool)
    return pools


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
    pp_group = pp_group if pp_group is not None else default_group("pp")
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
        pool._gathered_versions = (pool.A_shared._version, pool.B_shared._version)
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
    pp_group = pp_group if pp_group is not None else default_group("pp")
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
