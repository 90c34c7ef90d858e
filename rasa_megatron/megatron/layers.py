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

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import concat_factors, initial_diag, kaiming_init_, rasa_delta, rasa_linear
from ..layers import MergeableUpdate
from ..ops import AdapterCall, OutputSlot, draw_dropout_seed, fused_base_linear, fused_enabled_for
from ..parallel_layout import check_divisible
from .pools import ShardedRankPool
from .sharding import (COLUMN, ROW, accept_plain_base_keys, mark_partial_grad, mark_tp_sharded,
                       wrapper_sharded_state_dict, local_shard)


def _megatron_mappings():
    from megatron.core.tensor_parallel import mappings

    return mappings



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
            mark_partial_grad(*replicated_partial)
        if private_rank and parallel == COLUMN:
            mark_tp_sharded(self.B_private, dim=0)
        elif private_rank:
            mark_tp_sharded(self.A_private, dim=1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        object.__setattr__(self, "_base_weight_fn", None)
        self.reset_parameters(generator)

    @property
    def effective_rank(self) -> int:
        return self.private_rank + self.pool_rank

    @property
    def dropout_active(self) -> bool:
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training and self.dropout.p > 0

    def check_gradient_finalisation(self, config) -> None:
        """Refuse to train when RaSA's once-per-step reductions would not run: with TP > 1 (partial
        gradients of replicated factors) or a pipeline-sharded pool, ``config.finalize_model_grads_func``
        must be :func:`~rasa_megatron.megatron.grads.finalize_model_grads_with_rasa` (or a function marked
        ``finalizes_rasa_grads = True``), or unset when the loop calls ``finalize_rasa_grads`` itself.
        Megatron's own ``finalize_model_grads`` (what Megatron-LM's ``train()`` installs) would leave the
        TP copies of replicated factors to drift apart and the pool's gradient unreduced."""
        finalize = getattr(config, "finalize_model_grads_func", None)
        needs = self.tp_size > 1 or (self.pool is not None and not self.pool.is_whole)
        if needs and finalize is not None and not getattr(finalize, "finalizes_rasa_grads", False):
            raise RuntimeError(
                f"RaSA at tensor-parallel size {self.tp_size}" + (" with a pipeline-sharded pool" if self.pool is not None
                                                                   and not self.pool.is_whole else "")
                + f" needs its gradient reductions, but config.finalize_model_grads_func is {finalize!r}: set it to "
                "rasa_megatron.megatron.finalize_model_grads_with_rasa (Megatron-LM's train() installs Megatron's own "
                "finalize_model_grads; set ours after it) or train with rasa-train's engine: megatron")

    @property
    def active_dropout(self) -> float:
        """The dropout probability applied now (0 in eval mode or without dropout)."""
        return self.dropout.p if self.dropout_active else 0.0

    def draw_dropout_seed(self, device) -> tuple[int, int]:
        """The Philox ``(seed, offset)`` of this adapter's next dropout mask (fused path). Row layers at
        TP > 1 draw inside Megatron's ``model-parallel-rng`` tracker (independent masks per input shard,
        as :meth:`drop_shard`); everything else from the default generator, as HF's separate linears."""
        if self.parallel != ROW or self.tp_size == 1:
            return draw_dropout_seed(device)
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            return draw_dropout_seed(device)

    def drop_shard(self, x_shard: torch.Tensor) -> torch.Tensor:
        """Dropout on this TP rank's input shard ``[..., in/tp]`` (row layers): with TP > 1 the mask is
        drawn from Megatron's ``model-parallel-rng`` tracker state, which differs per TP rank, so the
        shards of one input get independent masks (the default generator is the same on every TP
        rank and would repeat one mask on every shard); at TP 1 from the default generator, as HF does."""
        if not self.dropout_active or self.tp_size == 1:
            return self.dropout(x_shard)
        from megatron.core import tensor_parallel

        with tensor_parallel.get_cuda_rng_tracker().fork():
            return self.dropout(x_shard)

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
        accept_plain_base_keys(self)
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

    def output_slots(self) -> dict[str, OutputSlot]:
        """Where each HF module's output ``[..., part_rows]`` lies in the fused local output ``[..., rows]``."""
        if self.layout == "qkv":
            g, d, hpg = self.query_groups_local, self.head_dim, self.heads_per_group
            return {"q_proj": OutputSlot(0, hpg * d, g), "k_proj": OutputSlot(hpg * d, d, g),
                    "v_proj": OutputSlot((hpg + 1) * d, d, g)}
        if self.layout == "glu":
            half = self.part_rows["gate_proj"]
            return {"gate_proj": OutputSlot(0, half), "up_proj": OutputSlot(half, half)}
        return {self.parts[0]: OutputSlot(0, self.part_rows[self.parts[0]])}

    def adapter_calls(self) -> list[AdapterCall]:
        """The group of the fused path: every adapter in HF module order (the order of the dropout draws)."""
        slots = self.output_slots()
        return [AdapterCall(adapter.local_factors(), slots[name], adapter.active_dropout, adapter.draw_dropout_seed)
                for name, adapter in self.adapters.items()]

    def adapter_output(self, total_input: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Fused local adapter output ``[..., rows]`` from the total input ``[..., in]``.

        Without active dropout the A-sides of all adapters read the same input: one GEMM. With it,
        each adapter draws its own mask, in HF module order (q, k, v; gate, up), as a HF model's
        separate linears do; the total input is the same on every TP rank, and so is the default
        generator's state, so every TP rank drops the same elements (the shards stay one function)."""
        names = list(self.adapters)
        active = [self.adapters[n] for n in names]
        factors = [a.factors() for a in active]
        dtype = active[0].diag.dtype
        outputs = {}
        if any(a.dropout_active for a in active):
            for name, adapter, (A, B) in zip(names, active, factors):
                outputs[name] = rasa_linear(adapter.dropout(total_input).to(dtype), None, None, A, B, adapter.diag)
            return self.combine(outputs, like.to(dtype))
        x = total_input.to(dtype)
        A_all = torch.cat([A for A, _ in factors], dim=0) if len(factors) > 1 else factors[0][0]
        h_all = F.linear(x, A_all)  # one GEMM for the A-sides of all adapters sharing this input
        start = 0
        for name, adapter, (A, B) in zip(names, active, factors):
            h = h_all[..., start:start + A.shape[0]]
            start += A.shape[0]
            outputs[name] = F.linear(h * adapter.diag, B)
        return self.combine(outputs, like.to(h_all.dtype))

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        tensors = {f"adapters.{name}.{pname}": param for name, adapter in self.adapters.items()
                   for pname, param in adapter.named_parameters(recurse=False)}
        entries = wrapper_sharded_state_dict(self.base_layer, tensors,
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
        if self.training and torch.is_grad_enabled():
            next(iter(self.adapters.values())).check_gradient_finalisation(base.config)
        if getattr(base, "explicit_expert_comm", False):  # MoE expert: the token dispatcher communicates
            total = input_
        elif base.sequence_parallel:
            total = maps.gather_from_sequence_parallel_region(input_, group=base.tp_group)
        else:
            total = maps.copy_to_tensor_model_parallel_region(input_, group=base.tp_group)
        bias = base.bias if not base.skip_bias_add else None
        weight = base.weight if weight is None else weight
        merged = any(a.merged for a in self.adapters.values())
        if not merged and fused_enabled_for(total, max(a.active_dropout for a in self.adapters.values())):
            output = fused_base_linear(total, weight, bias, self.adapter_calls())
        else:
            output = F.linear(total, weight, bias)
            if not merged:
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
        accept_plain_base_keys(self)
        layer = self
        object.__setattr__(adapter, "_base_weight_fn", lambda: layer.base_layer.weight)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        tensors = {f"adapter.{pname}": param for pname, param in self.adapter.named_parameters(recurse=False)}
        return wrapper_sharded_state_dict(self.base_layer, tensors, {"adapter.A_private": 1}, prefix,
                                           sharded_offsets, metadata)

    def forward(self, input_: torch.Tensor):
        base, maps = self.base_layer, _megatron_mappings()
        if self.training and torch.is_grad_enabled():
            self.adapter.check_gradient_finalisation(base.config)
        x = input_ if base.input_is_parallel else maps.scatter_to_tensor_model_parallel_region(input_, group=base.tp_group)
        adapter = self.adapter
        if adapter.merged:
            partial = F.linear(x, base.weight)
        elif fused_enabled_for(x, adapter.active_dropout):
            # x_shard A_shardᵀ is a partial sum over TP ranks, and so is the adapter's output
            call = [AdapterCall(adapter.local_factors(), OutputSlot(0, adapter.out_local), adapter.active_dropout,
                                adapter.draw_dropout_seed)]
            partial = fused_base_linear(x, base.weight, None, call)
        else:
            adapter_input = adapter.drop_shard(x).to(adapter.diag.dtype)
            partial = F.linear(x, base.weight) + rasa_linear(adapter_input, *adapter.local_factors()).to(x.dtype)
        if getattr(base, "explicit_expert_comm", False):  # MoE expert: the token dispatcher reduces
            output = partial
        elif base.sequence_parallel:
            output = maps.reduce_scatter_to_sequence_parallel_region(partial, group=base.tp_group)
        else:
            output = maps.reduce_from_tensor_model_parallel_region(partial, group=base.tp_group)
        if base.skip_bias_add:
            return output, base.bias
        return (output + base.bias if base.bias is not None else output), None
