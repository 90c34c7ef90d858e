"""RaSALinear: a frozen ``nn.Linear`` plus its RaSA update (single device)."""
from __future__ import annotations

import torch
from torch import nn

from .functional import initial_diag, kaiming_init_, rasa_delta, rasa_linear
from .ops import AdapterCall, OutputSlot, fused_accumulate, fused_enabled_for, fused_linear, runs_plain_linear
from .pool import RankPool, init_on_cpu_then_move_


class MergeableUpdate:
    """Merge/unmerge of ``delta_weight()`` into ``_base_weight()`` (shared by the adapter units)."""

    merged: bool
    layer_index: int

    @torch.no_grad()
    def _add_delta_to_weight(self, sign: float) -> None:
        weight = self._base_weight()
        compute = torch.promote_types(weight.dtype, torch.float32)
        delta = self.delta_weight().to(compute).reshape(weight.shape)  # a fused weight's view may be 3-D
        weight.copy_((weight.to(compute) + sign * delta).to(weight.dtype))

    def merge(self) -> None:
        """Add ΔW into the base weight (computed in fp32 or better, then cast)."""
        if self.merged:
            raise RuntimeError(f"layer {self.layer_index}: RaSA update is already merged")
        self._add_delta_to_weight(1.0)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again (exact up to the base dtype's rounding)."""
        if not self.merged:
            raise RuntimeError(f"layer {self.layer_index}: RaSA update is not merged")
        self._add_delta_to_weight(-1.0)
        self.merged = False


class RaSALinear(MergeableUpdate, nn.Module):
    """``y = base(x) + [B_private | B_S] diag(D) [A_private ; A_S] dropout(x)``.

    Args:
        base_layer: the frozen linear, weight ``[out_features, in_features]``.
        private_rank: ``r - k`` (0 means no private part).
        pool: the module type's :class:`RankPool`, or None when ``k = 0``.
        alpha: scaling numerator for the diagonal's init (paper eq. 6).
        dropout: dropout probability on the adapter input.
        layer_index: index of the decoder layer this linear belongs to.

    Attributes:
        A_private: ``[r-k, in]`` (absent when ``k = r``).  B_private: ``[out, r-k]``.
        diag: ``[r-k+L*k]`` trainable diagonal ``D_i``, private entries first.
        merged: whether ΔW is currently added into ``base_layer.weight``.
    """

    def __init__(self, base_layer: nn.Linear, private_rank: int, pool: RankPool | None,
                 alpha: float, dropout: float = 0.0, layer_index: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if private_rank == 0 and pool is None:
            raise ValueError("RaSALinear needs private_rank >= 1 or a pool")
        if pool is not None and (pool.in_features, pool.out_features) != (base_layer.in_features,
                                                                           base_layer.out_features):
            raise ValueError(
                f"pool shape (in={pool.in_features}, out={pool.out_features}) does not match the linear "
                f"(in={base_layer.in_features}, out={base_layer.out_features}) of layer {layer_index}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.private_rank = private_rank
        self.pool_rank = 0 if pool is None else pool.pool_rank
        self.alpha = alpha
        self.layer_index = layer_index
        self.merged = False
        # The pool is owned by the model's `rasa_pools`; keep an unregistered reference here so it
        # is stored and optimised once, not once per layer.
        object.__setattr__(self, "pool", pool)
        if private_rank:
            self.A_private = nn.Parameter(torch.empty(private_rank, self.in_features, dtype=dtype))
            self.B_private = nn.Parameter(torch.empty(self.out_features, private_rank, dtype=dtype))
        else:
            self.A_private = self.B_private = None
        self.diag = nn.Parameter(torch.empty(private_rank + self.pool_rank, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_on_cpu_then_move_(self, base_layer.weight.device)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Paper eq. 6 and §2.2: Kaiming A, zero B, D = α/(2(r-k)) private, α/(2Lk) pooled."""
        if self.diag.device.type == "meta":
            return
        if self.A_private is not None:
            kaiming_init_(self.A_private, generator)
            self.B_private.zero_()
        self.diag.copy_(initial_diag(self.alpha, self.private_rank, self.pool_rank))

    @property
    def effective_rank(self) -> int:
        return self.private_rank + self.pool_rank

    def _factors(self):
        pool = self.pool
        return (self.A_private, self.B_private,
                None if pool is None else pool.A_shared, None if pool is None else pool.B_shared,
                self.diag)

    def delta_weight(self) -> torch.Tensor:
        """Dense ``ΔW_i: [out, in]`` in the adapter dtype (see :func:`functional.rasa_delta`)."""
        return rasa_delta(*self._factors())

    @property
    def active_dropout(self) -> float:
        """The dropout probability applied now (0 in eval mode or without dropout)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if fused_enabled_for(x, self.active_dropout):
            call = [AdapterCall(self._factors(), OutputSlot(0, self.out_features), self.active_dropout)]
            if runs_plain_linear(self.base_layer) and x.dtype == self.base_layer.weight.dtype:
                return fused_linear(x, self.base_layer.weight, self.base_layer.bias, call)
            result = self.base_layer(x)
            return fused_accumulate(result, x.to(result.dtype), call)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unfused path: ``functional.rasa_linear`` through autograd, in the adapter dtype."""
        result = self.base_layer(x)
        if self.merged:
            return result
        adapter_input = self.dropout(x).to(self.diag.dtype)
        return result + rasa_linear(adapter_input, *self._factors()).to(result.dtype)

    def _base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"private_rank={self.private_rank}, pool_rank={self.pool_rank}, "
                f"layer_index={self.layer_index}, merged={self.merged}")
