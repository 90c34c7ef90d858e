"""RaSA on stacked MoE expert weights (transformers 5 ``MixtralExperts`` and alike).

In transformers 5 the experts of a sparse-MoE block are two 3-D parameters, not ``nn.Linear``s:
``gate_up_proj: [E, 2I, H]`` and ``down_proj: [E, H, I]`` (expert ``e`` computes
``down_proj[e] · (act(gate) * up)`` with ``[gate; up] = gate_up_proj[e] · x``). Each stacked weight
gets one :class:`RaSAExpertWeights`: every expert has its own private ranks and diagonal, and the
pool is per expert index, shared across layers (expert ``e`` of every layer draws on pool ``e``),
the grouping of the authors' code.

Why that grouping: it keeps each expert's update at the paper's effective rank ``r-k+Lk`` with
LoRA's parameter count per expert, and a token routed to expert ``e`` costs ``r-k+Lk`` ranks, not
``E L k``. Pooling across the experts of a layer instead would tie together experts that the router
trained to differ, and would make an expert's rank depend on ``E``. The pool is a per-index
convention (expert ``e`` of layer 3 and of layer 7 are not aligned by function), exactly as the
per-module-type pool of dense layers is a per-position convention.

:class:`RaSAExperts` replaces the experts module and runs the eager per-expert loop of
transformers with ``F.linear(x, W[e]) + rasa_linear(x, factors[e])`` in place of each projection;
the base module's optimised kernels (``grouped_mm``, ...) are bypassed while adapters are active.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functional import initial_diag, kaiming_init_, rasa_delta, rasa_linear
from .layers import MergeableUpdate
from .pool import RankPool, init_on_cpu_then_move_

EXPERT_WEIGHT_NAMES = ("gate_up_proj", "down_proj")


def check_fused_experts(module: nn.Module, where: str) -> None:
    """Raise unless ``module`` is a fused experts module RaSA knows how to run: 3-D ``gate_up_proj
    [E, 2I, H]`` and ``down_proj [E, H, I]``, gated activation, ``[E, out, in]`` layout, no biases."""
    problems = []
    for name in EXPERT_WEIGHT_NAMES:
        weight = getattr(module, name, None)
        shape = getattr(weight, "ds_shape", None if weight is None else weight.shape)
        if not isinstance(weight, nn.Parameter) or len(shape) != 3:
            problems.append(f"no 3-D parameter {name!r}")
    if getattr(module, "is_transposed", False):
        problems.append("weights stored transposed ([E, in, out])")
    if getattr(module, "has_bias", False):
        problems.append("expert biases")
    if not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
        problems.append("a non-gated or post-normed expert MLP")
    if not hasattr(module, "act_fn"):
        problems.append("no act_fn")
    if problems:
        raise ValueError(f"{where} is a {type(module).__name__} with {', '.join(problems)}; RaSA adapts fused "
                         "experts laid out as transformers 5 MixtralExperts (gate_up_proj [E, 2I, H], "
                         "down_proj [E, H, I], gated activation, no bias)")


def expert_weight_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """``(E, out, in)`` of a stacked expert weight (its full shape, also when ZeRO-3 partitioned it)."""
    weight = getattr(module, name)
    return tuple(getattr(weight, "ds_shape", weight.shape))


class RaSAExpertWeights(MergeableUpdate, nn.Module):
    """The RaSA update of one stacked expert weight ``W: [E, out, in]`` of one layer.

    Attributes:
        A_private: ``[E, r-k, in]`` (absent when ``k = r``).  B_private: ``[E, out, r-k]``.
        diag: ``[E, r-k+L*k]`` one trainable diagonal per expert, private entries first.
        pool: the module type's :class:`RankPool` with ``num_experts = E`` (unregistered reference).
        merged: whether ΔW is currently added into the base weight.
    """

    def __init__(self, experts: nn.Module, weight_name: str, private_rank: int, pool: RankPool | None,
                 alpha: float, dropout: float = 0.0, layer_index: int = 0, dtype: torch.dtype = torch.float32):
        super().__init__()
        if private_rank == 0 and pool is None:
            raise ValueError("RaSAExpertWeights needs private_rank >= 1 or a pool")
        num_experts, out_features, in_features = expert_weight_shape(experts, weight_name)
        if pool is not None and (pool.num_experts, pool.out_features, pool.in_features) != (
                num_experts, out_features, in_features):
            raise ValueError(f"pool (experts={pool.num_experts}, out={pool.out_features}, in={pool.in_features}) "
                             f"does not match {weight_name} [{num_experts}, {out_features}, {in_features}] "
                             f"of layer {layer_index}")
        object.__setattr__(self, "experts", experts)  # the base module is registered by RaSAExperts
        object.__setattr__(self, "pool", pool)        # the pool is registered under model.rasa_pools
        self.weight_name = weight_name
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.private_rank = private_rank
        self.pool_rank = 0 if pool is None else pool.pool_rank
        self.alpha = alpha
        self.layer_index = layer_index
        self.merged = False
        if private_rank:
            self.A_private = nn.Parameter(torch.empty(num_experts, private_rank, in_features, dtype=dtype))
            self.B_private = nn.Parameter(torch.empty(num_experts, out_features, private_rank, dtype=dtype))
        else:
            self.A_private = self.B_private = None
        self.diag = nn.Parameter(torch.empty(num_experts, self.effective_rank, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        init_on_cpu_then_move_(self, getattr(experts, weight_name).device)

    @property
    def effective_rank(self) -> int:
        return self.private_rank + self.pool_rank

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Paper eq. 6 per expert: Kaiming A (fan-in ``in``), zero B, D = α/(2(r-k)) / α/(2Lk)."""
        if self.diag.device.type == "meta":
            return
        if self.A_private is not None:
            for A in self.A_private:
                kaiming_init_(A, generator)
            self.B_private.zero_()
        self.diag.copy_(initial_diag(self.alpha, self.private_rank, self.pool_rank).expand_as(self.diag))

    def _factors(self, expert: int | None = None):
        """``(A_private, B_private, A_shared, B_shared, diag)`` of one expert, or stacked for all."""
        pool = self.pool
        factors = (self.A_private, self.B_private,
                   None if pool is None else pool.A_shared, None if pool is None else pool.B_shared, self.diag)
        if expert is None:
            return factors
        return tuple(None if t is None else t[expert] for t in factors)

    def delta_weight(self) -> torch.Tensor:
        """Dense ``ΔW: [E, out, in]`` in the adapter dtype."""
        return rasa_delta(*self._factors())

    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """Adapter output ``[tokens, out]`` of expert ``expert`` for its tokens ``x: [tokens, in]``."""
        return rasa_linear(self.dropout(x).to(self.diag.dtype), *self._factors(expert))

    def _base_weight(self) -> torch.Tensor:
        return getattr(self.experts, self.weight_name)

    def extra_repr(self) -> str:
        return (f"{self.weight_name}: experts={self.num_experts}, in_features={self.in_features}, "
                f"out_features={self.out_features}, private_rank={self.private_rank}, "
                f"pool_rank={self.pool_rank}, layer_index={self.layer_index}, merged={self.merged}")


class RaSAExperts(nn.Module):
    """A fused experts module with RaSA on some of its stacked weights; same call signature.

    Args:
        base_layer: the frozen experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``).
        adapters: ``{weight name: RaSAExpertWeights}``, registered as children under those names.
    """

    def __init__(self, base_layer: nn.Module, adapters: dict[str, RaSAExpertWeights]):
        super().__init__()
        unknown = sorted(set(adapters) - set(EXPERT_WEIGHT_NAMES))
        if unknown:
            raise ValueError(f"unknown expert weights {unknown}; RaSA adapts {list(EXPERT_WEIGHT_NAMES)}")
        self.base_layer = base_layer
        for name, adapter in adapters.items():
            self.add_module(name, adapter)

    def _project(self, x: torch.Tensor, name: str, expert: int) -> torch.Tensor:
        out = F.linear(x, getattr(self.base_layer, name)[expert])
        adapter = self._modules.get(name)
        if adapter is not None and not adapter.merged:
            out = out + adapter(x, expert).to(out.dtype)
        return out

    def _activate(self, gate_up: torch.Tensor) -> torch.Tensor:
        apply_gate = getattr(self.base_layer, "_apply_gate", None)
        if apply_gate is not None:
            return apply_gate(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.base_layer.act_fn(gate) * up

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """``hidden_states: [tokens, H]``, ``top_k_index``/``top_k_weights: [tokens, top_k]`` -> ``[tokens, H]``."""
        num_experts = expert_weight_shape(self.base_layer, "down_proj")[0]
        final_hidden_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            # num_classes E + 1: index E marks tokens sent to no local expert (expert parallelism)
            expert_mask = F.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in expert_hit[:, 0].tolist():
            if expert == num_experts:
                continue
            top_k_pos, token_idx = torch.where(expert_mask[expert])
            current_state = hidden_states[token_idx]
            hidden = self._activate(self._project(current_state, "gate_up_proj", expert))
            out = self._project(hidden, "down_proj", expert) * top_k_weights[token_idx, top_k_pos, None]
            final_hidden_states.index_add_(0, token_idx, out.to(final_hidden_states.dtype))
        return final_hidden_states
