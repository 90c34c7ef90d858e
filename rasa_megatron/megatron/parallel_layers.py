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

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..functional import initial_diag, kaiming_init_, rasa_delta
from ..layers import MergeableUpdate
from ..pool import RankPool

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


def shard_of(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    """The ``rank``-th of ``size`` contiguous chunks of ``full`` along ``dim`` (a copy)."""
    check_divisible(full.shape[dim], size, f"dim {dim} of a {list(full.shape)} tensor", "the tensor-parallel size")
    return full.chunk(size, dim=dim)[rank].clone()


def _mark_partial(*params: nn.Parameter) -> None:
    for param in params:
        setattr(param, PARTIAL_GRAD_ATTR, True)


class ShardedRankPool(RankPool):
    """The pool of one module type, sharded like its module: ``A_S: [Lk, in_local]``,
    ``B_S: [out_local, Lk]`` (column: ``out_local = out / tp``; row: ``in_local = in / tp``).

    Initialised from the full-size init (Kaiming with the full fan-in) drawn from ``generator``, so
    every TP rank holds a slice of the same pool a single process would hold.
    """

    def __init__(self, in_features: int, out_features: int, pool_rank: int, num_layers: int, parallel: str,
                 tp_rank: int, tp_size: int, dtype=torch.float32, generator: torch.Generator | None = None):
        if parallel not in (COLUMN, ROW):
            raise ValueError(f"parallel must be {COLUMN!r} or {ROW!r}, got {parallel!r}")
        self.parallel, self.tp_rank, self.tp_size = parallel, tp_rank, tp_size
        self.full_in_features, self.full_out_features = in_features, out_features
        in_local = check_divisible(in_features, tp_size, "in_features", "tensor-parallel size") if parallel == ROW \
            else in_features
        out_local = check_divisible(out_features, tp_size, "out_features", "tensor-parallel size") \
            if parallel == COLUMN else out_features
        self._generator = generator
        super().__init__(in_local, out_local, pool_rank, num_layers, dtype=dtype)
        _mark_partial(*((self.A_shared,) if parallel == COLUMN else (self.B_shared,)))

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        generator = generator or getattr(self, "_generator", None)
        full_A = torch.empty(self.pool_rank, self.full_in_features, dtype=self.A_shared.dtype)
        kaiming_init_(full_A, generator)
        self.A_shared.copy_(shard_of(full_A, 1, self.tp_rank, self.tp_size) if self.parallel == ROW else full_A)
        self.B_shared.zero_()


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
        _mark_partial(*replicated_partial)
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
            self.A_private.copy_(shard_of(full_A, 1, self.tp_rank, self.tp_size) if self.parallel == ROW else full_A)
            self.B_private.zero_()
        self.diag.copy_(initial_diag(self.alpha, self.private_rank, self.pool_rank))

    def factors(self):
        """``(A [R, in_local], B [out_local, R])``: private and pooled ranks concatenated."""
        pool = self.pool
        A_parts = [t for t in (self.A_private, None if pool is None else pool.A_shared) if t is not None]
        B_parts = [t for t in (self.B_private, None if pool is None else pool.B_shared) if t is not None]
        A = A_parts[0] if len(A_parts) == 1 else torch.cat(A_parts, dim=0)
        B = B_parts[0] if len(B_parts) == 1 else torch.cat(B_parts, dim=1)
        return A, B

    def local_factors(self):
        pool = self.pool
        return (self.A_private, self.B_private, None if pool is None else pool.A_shared,
                None if pool is None else pool.B_shared, self.diag)

    def delta_weight(self) -> torch.Tensor:
        """This rank's ``ΔW`` shard: column ``[out/tp, in]``; row ``[out, in/tp]``."""
        return rasa_delta(*self.local_factors())

    @torch.no_grad()
    def load_full_(self, A_private, B_private, A_shared, B_shared, diag) -> None:
        """Copy this rank's slice of full-size (single-process) factors in; the pool's too."""
        dim_A, dim_B = (1, None) if self.parallel == ROW else (None, 0)

        def take(t, dim):
            return t if dim is None else shard_of(t, dim, self.tp_rank, self.tp_size)

        if self.A_private is not None:
            self.A_private.copy_(take(A_private, dim_A))
            self.B_private.copy_(take(B_private, dim_B))
        if self.pool is not None:
            self.pool.A_shared.copy_(take(A_shared, dim_A))
            self.pool.B_shared.copy_(take(B_shared, dim_B))
        self.diag.copy_(diag)

    def _base_weight(self) -> torch.Tensor:
        if self._base_weight_fn is None:
            raise RuntimeError("this adapter is not attached to a base layer")
        return self._base_weight_fn()


class _FusedOutput:
    """How adapter outputs of one fused projection are placed in the base layer's local output."""

    def __init__(self, kind: str, query_groups_local: int = 0, heads_per_group: int = 0, head_dim: int = 0):
        self.kind, self.query_groups_local = kind, query_groups_local
        self.heads_per_group, self.head_dim = heads_per_group, head_dim

    def combine(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        if self.kind == "qkv":
            q, k, v = outputs
            lead = q.shape[:-1]
            g, d = self.query_groups_local, self.head_dim
            fused = torch.cat([q.reshape(*lead, g, self.heads_per_group * d), k.reshape(*lead, g, d),
                               v.reshape(*lead, g, d)], dim=-1)
            return fused.reshape(*lead, -1)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)

    def split_weight(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """Views of the local fused base weight, one per adapted HF module, in ``combine`` order."""
        if self.kind == "qkv":
            g, d, hpg = self.query_groups_local, self.head_dim, self.heads_per_group
            grouped = weight.view(g, (hpg + 2) * d, weight.shape[-1])
            return [grouped[:, : hpg * d], grouped[:, hpg * d: (hpg + 1) * d], grouped[:, (hpg + 1) * d:]]
        return list(weight.chunk(2, dim=0)) if self.kind == "glu" else [weight]


class RaSAColumnParallelLinear(nn.Module):
    """A frozen Megatron ``ColumnParallelLinear`` plus RaSA adapters; same call/return as the base.

    Args:
        base_layer: the Megatron layer (``gather_output`` and ``skip_bias_add`` are honoured).
        adapters: ``{hf name: ShardedRaSA}`` (column), in output order: one for a plain
            projection, ``q, k, v`` for ``linear_qkv`` (``layout="qkv"``), ``gate, up`` for SwiGLU
            ``linear_fc1`` (``layout="glu"``).
        query_groups_local, heads_per_group, head_dim: the ``qkv`` layout on this TP rank.
    """

    def __init__(self, base_layer: nn.Module, adapters: dict[str, ShardedRaSA], layout: str = "plain",
                 query_groups_local: int = 0, heads_per_group: int = 0, head_dim: int = 0):
        super().__init__()
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict(adapters)
        self.fused = _FusedOutput(layout, query_groups_local, heads_per_group, head_dim)
        want = {"plain": 1, "qkv": 3, "glu": 2}[layout]
        if len(adapters) != want:
            raise ValueError(f"layout {layout!r} needs {want} adapters, got {list(adapters)}")
        local = sum(a.out_local for a in adapters.values())
        if local != base_layer.weight.shape[0]:
            raise ValueError(f"adapters cover {local} local output rows, the base layer has {base_layer.weight.shape[0]}")
        layer = self
        for index, adapter in enumerate(adapters.values()):
            if adapter.parallel != COLUMN:
                raise ValueError("RaSAColumnParallelLinear needs column adapters")

            def view(index=index):  # merge/unmerge write into this adapter's rows of the fused weight
                return layer.fused.split_weight(layer.base_layer.weight)[index]
            object.__setattr__(adapter, "_base_weight_fn", view)

    def adapter_output(self, total_input: torch.Tensor) -> torch.Tensor:
        """Fused local adapter output ``[..., out_local]`` from the total input ``[..., in]``."""
        active = list(self.adapters.values())
        factors = [a.factors() for a in active]
        x = active[0].dropout(total_input).to(active[0].diag.dtype)
        A_all = torch.cat([A for A, _ in factors], dim=0) if len(factors) > 1 else factors[0][0]
        h_all = F.linear(x, A_all)  # one GEMM for the A-sides of all adapters sharing this input
        outputs, start = [], 0
        for adapter, (A, B) in zip(active, factors):
            h = h_all[..., start:start + A.shape[0]]
            start += A.shape[0]
            outputs.append(F.linear(h * adapter.diag, B))
        return self.fused.combine(outputs)

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        base, maps = self.base_layer, _megatron_mappings()
        if base.sequence_parallel:
            total = maps.gather_from_sequence_parallel_region(input_, group=base.tp_group)
        else:
            total = maps.copy_to_tensor_model_parallel_region(input_, group=base.tp_group)
        bias = base.bias if not base.skip_bias_add else None
        output = F.linear(total, base.weight if weight is None else weight, bias)
        if not any(a.merged for a in self.adapters.values()):
            output = output + self.adapter_output(total).to(output.dtype)
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
        layer = self
        object.__setattr__(adapter, "_base_weight_fn", lambda: layer.base_layer.weight)

    def forward(self, input_: torch.Tensor):
        base, maps = self.base_layer, _megatron_mappings()
        x = input_ if base.input_is_parallel else maps.scatter_to_tensor_model_parallel_region(input_, group=base.tp_group)
        partial = F.linear(x, base.weight)
        adapter = self.adapter
        if not adapter.merged:
            A, B = adapter.factors()
            h = F.linear(adapter.dropout(x).to(adapter.diag.dtype), A)  # partial sum over TP ranks
            partial = partial + F.linear(h * adapter.diag, B).to(partial.dtype)
        if base.sequence_parallel:
            output = maps.reduce_scatter_to_sequence_parallel_region(partial, group=base.tp_group)
        else:
            output = maps.reduce_from_tensor_model_parallel_region(partial, group=base.tp_group)
        if base.skip_bias_add:
            return output, base.bias
        return (output + base.bias if base.bias is not None else output), None


def partial_grad_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Trainable RaSA parameters whose gradient is a partial sum over the TP group, each once
    (pools included, also when the module holds only the adapters' unregistered references)."""
    seen, out = set(), []
    pools = [m.pool.parameters() for m in module.modules() if isinstance(m, ShardedRaSA) and m.pool is not None]
    for param in itertools.chain(module.parameters(), *pools):
        if getattr(param, PARTIAL_GRAD_ATTR, False) and param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            out.append(param)
    return out


def finalize_rasa_grads(model, tp_group=None) -> int:
    """Sum the partial RaSA gradients over the tensor-parallel group (one coalesced all-reduce).

    Call once per optimizer step after the backward passes of all micro-batches, next to (before or
    after) Megatron's ``finalize_model_grads``. Reads ``param.main_grad`` when Megatron's DDP gave
    one, else ``param.grad``. Returns the number of all-reduce calls issued (0 or 1).
    """
    modules = model if isinstance(model, (list, tuple)) else [model]
    if tp_group is None:
        from megatron.core import parallel_state

        tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return 0
    grads = []
    for module in modules:
        for param in partial_grad_parameters(module):
            grad = getattr(param, "main_grad", None)
            grad = param.grad if grad is None else grad
            if grad is not None:
                grads.append(grad)
    if not grads:
        return 0
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=tp_group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)
    return 1
