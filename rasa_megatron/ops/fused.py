"""The fused RaSA autograd path: one ``torch.autograd.Function`` per group of adapters sharing an input.

For a group (q/k/v of one attention, gate/up of one MLP, or a single linear) with input ``x: [N, a]``
and the base layer's output ``out: [N, C]`` (each adapter ``j`` owns an :class:`OutputSlot` of it):

* forward: ``h = x [A_1; A_2; ...]ᵀ`` in **one** GEMM for the adapters without active dropout (an
  adapter with dropout reads ``dropout_cast(x)``, its Philox mask drawn from ``(seed, offset)`` and
  never stored); ``D`` scales the ``[N, R]`` intermediate in fp32; ``B`` is accumulated into the base
  output in place (``addmm_``, beta = 1; ``baddbmm_`` for Megatron's interleaved q/k/v groups);
* backward: ``dx = g W`` (when the Function ran the base GEMM) with the adapters' ``dh A`` added in
  place (``addmm_``, or ``rasa::dropout_cast_add_``: one pass over the regenerated mask adds the
  dropped-out ``dh A`` to ``dx`` and returns the dropped-out input for ``dA``); ``dA``, ``dB``, ``dD``
  split into the private and pool parts (the pool's gradient is a slice autograd accumulates across
  layers, no per-layer copy).

The small factors are cast to the activation dtype (fp32 masters stay with the optimizer); saved for
backward: ``x`` (which a frozen base does not keep for itself), the ``[N, R]`` intermediates and the
factors themselves. The value equals :func:`rasa_megatron.functional.rasa_linear` (tests: fp64, 1e-12).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .dispatch import draw_dropout_seed, dropout_cast, dropout_cast_add_
from .philox import accumulate_dtype, dropout_scale, dropout_threshold

FACTORS_PER_ADAPTER = 5  # A_private, B_private, A_shared, B_shared, diag


@dataclass(frozen=True)
class OutputSlot:
    """Where one adapter's output ``[N, groups * width]`` goes in the base output ``[N, C]``: viewed as
    ``[N, groups, C / groups]``, columns ``start : start + width`` of every group (``groups = 1``: a plain
    column range; Megatron's ``linear_qkv``: one group per query group)."""

    start: int
    width: int
    groups: int = 1


@dataclass(frozen=True)
class AdapterCall:
    """One adapter of a group: its 5 factors (``A_private [r-k, a]``, ``B_private [G*w, r-k]``,
    ``A_shared [Lk, a]``, ``B_shared [G*w, Lk]``, ``diag [R]``; a part may be None), its output slot and
    its dropout probability (0 when inactive) and, optionally, its own ``draw_seed(device) -> (seed,
    offset)`` (default: the group's)."""

    factors: tuple
    slot: OutputSlot
    dropout: float = 0.0
    draw_seed: object = None


@dataclass(frozen=True)
class _Plan:
    slots: tuple
    private_widths: tuple
    pool_widths: tuple
    dropout: tuple  # per adapter: None or (seed, offset, threshold, scale)


def _cast_factors(factors: Sequence, n: int, dtype: torch.dtype) -> tuple[list, list, list]:
    """Per adapter ``[A_private; A_shared]: [R, a]`` and ``[B_private | B_shared]: [G*w, R]`` in ``dtype``, and diag."""
    As, Bs, Ds = [], [], []
    for j in range(n):
        A_p, B_p, A_s, B_s, diag = factors[FACTORS_PER_ADAPTER * j: FACTORS_PER_ADAPTER * (j + 1)]
        A_parts = [t.to(dtype) for t in (A_p, A_s) if t is not None]
        B_parts = [t.to(dtype) for t in (B_p, B_s) if t is not None]
        As.append(A_parts[0] if len(A_parts) == 1 else torch.cat(A_parts, dim=0))
        Bs.append(B_parts[0] if len(B_parts) == 1 else torch.cat(B_parts, dim=1))
        Ds.append(diag)
    return As, Bs, Ds


def _scaled(h: Tensor, diag: Tensor) -> Tensor:
    """``h · diag(D)`` computed in fp32 (fp64 for fp64), rounded once to ``h``'s dtype."""
    if h.dtype == diag.dtype and h.dtype in (torch.float32, torch.float64):
        return h * diag
    acc = accumulate_dtype(h.dtype, diag.dtype)
    return (h.to(acc) * diag.to(acc)).to(h.dtype)


def _slot_view(out2: Tensor, slot: OutputSlot) -> Tensor:
    """The slot of ``out2: [N, C]``: ``[N, w]`` (groups 1) or ``[G, N, w]``."""
    if slot.groups == 1:
        return out2[:, slot.start: slot.start + slot.width]
    per_group = out2.shape[1] // slot.groups
    return out2.view(out2.shape[0], slot.groups, per_group)[:, :, slot.start: slot.start + slot.width].transpose(0, 1)


def _accumulate(out2: Tensor, hd: Tensor, B: Tensor, slot: OutputSlot) -> None:
    target = _slot_view(out2, slot)
    if slot.groups == 1:
        target.addmm_(hd, B.t())
    else:
        target.baddbmm_(hd.unsqueeze(0).expand(slot.groups, -1, -1), B.view(slot.groups, slot.width, -1).transpose(1, 2))


def _slot_grad(g2: Tensor, slot: OutputSlot) -> Tensor:
    """The output gradient of one adapter as ``[N, G*w]`` (rows of B in the adapter's own order)."""
    if slot.groups == 1:
        return g2[:, slot.start: slot.start + slot.width]
    view = _slot_view(g2, slot)  # [G, N, w]
    return view.transpose(0, 1).reshape(g2.shape[0], slot.groups * slot.width)


class _FusedRaSAGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base_out, x, weight, bias, plan: _Plan, *factors):
        # base_out first: in-place on a view (CopySlices) maps the first input's gradient to the view
        n = len(plan.slots)
        compute = x.dtype
        x2 = x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        if weight is not None:
            out = F.linear(x, weight, bias)
        else:
            out = base_out
            ctx.mark_dirty(out)
        out2 = out.view(-1, out.shape[-1])
        As, Bs, Ds = _cast_factors(factors, n, compute)
        shared = [j for j in range(n) if plan.dropout[j] is None]
        h = [None] * n
        h_shared = None
        if shared:
            A_shared = As[shared[0]] if len(shared) == 1 else torch.cat([As[j] for j in shared], dim=0)
            h_shared = torch.mm(x2, A_shared.t())  # one A-side GEMM for every adapter reading x itself
            for j, part in zip(shared, h_shared.split([As[j].shape[0] for j in shared], dim=1)):
                h[j] = part
        dropped_h = []
        for j in range(n):
            if plan.dropout[j] is not None:
                seed, offset, threshold, scale = plan.dropout[j]
                h[j] = torch.mm(dropout_cast(x2, seed, offset, threshold, scale, compute), As[j].t())
                dropped_h.append(h[j])
        for j in range(n):
            _accumulate(out2, _scaled(h[j], Ds[j]), Bs[j], plan.slots[j])
        ctx.plan, ctx.x_shape, ctx.module_mode = plan, x.shape, weight is None
        ctx.save_for_backward(x2, weight, h_shared, *dropped_h, *factors)
        return out

    @staticmethod
    @once_differentiable  # the backward is not itself differentiable (no double backward)
    def backward(ctx, g):
        plan = ctx.plan
        n = len(plan.slots)
        x2, weight, h_shared, *rest = ctx.saved_tensors
        dropped = [j for j in range(n) if plan.dropout[j] is not None]
        shared = [j for j in range(n) if plan.dropout[j] is None]
        dropped_h, factors = rest[: len(dropped)], rest[len(dropped):]
        needs = ctx.needs_input_grad
        factor_needs = needs[5:]
        compute = x2.dtype
        g2 = g.reshape(-1, g.shape[-1])
        if g2.dtype != compute:
            g2 = g2.to(compute)
        As, Bs, Ds = _cast_factors(factors, n, compute)
        h = [None] * n
        if shared:
            for j, part in zip(shared, h_shared.split([As[j].shape[0] for j in shared], dim=1)):
                h[j] = part
        for j, hj in zip(dropped, dropped_h):
            h[j] = hj
        dx = torch.mm(g2, weight.to(compute)) if needs[1] and weight is not None else None
        dA, dB, dD, dh = [None] * n, [None] * n, [None] * n, [None] * n
        for j in range(n):
            gj = _slot_grad(g2, plan.slots[j])
            ghd = torch.mm(gj, Bs[j])  # [N, R]
            base = FACTORS_PER_ADAPTER * j
            if factor_needs[base + 1] or factor_needs[base + 3]:
                dB[j] = torch.mm(gj.t(), _scaled(h[j], Ds[j]))
            acc = accumulate_dtype(compute, Ds[j].dtype)
            if factor_needs[base + 4]:
                dD[j] = (ghd.to(acc) * h[j].to(acc)).sum(0)
            dh[j] = (ghd.to(acc) * Ds[j].to(acc)).to(compute)
        if shared:
            dh_shared = dh[shared[0]] if len(shared) == 1 else torch.cat([dh[j] for j in shared], dim=1)
            if any(factor_needs[FACTORS_PER_ADAPTER * j] or factor_needs[FACTORS_PER_ADAPTER * j + 2] for j in shared):
                dA_shared = torch.mm(dh_shared.t(), x2)
                for j, part in zip(shared, dA_shared.split([As[j].shape[0] for j in shared], dim=0)):
                    dA[j] = part
            if needs[1]:
                A_cat = As[shared[0]] if len(shared) == 1 else torch.cat([As[j] for j in shared], dim=0)
                dx = torch.mm(dh_shared, A_cat) if dx is None else dx.addmm_(dh_shared, A_cat)
        for j in dropped:
            seed, offset, threshold, scale = plan.dropout[j]
            base = FACTORS_PER_ADAPTER * j
            wants_dA = factor_needs[base] or factor_needs[base + 2]
            if needs[1]:  # one pass over the regenerated mask: dx += dropout(dh A) and the dropped input
                if dx is None:
                    dx = torch.zeros_like(x2)
                dropped_x = dropout_cast_add_(dx, torch.mm(dh[j], As[j]), x2, seed, offset, threshold, scale)
            elif wants_dA:
                dropped_x = dropout_cast(x2, seed, offset, threshold, scale, compute)
            if wants_dA:
                dA[j] = torch.mm(dh[j].t(), dropped_x)
        grads = []
        for j in range(n):
            A_p, B_p, A_s, B_s, diag = factors[FACTORS_PER_ADAPTER * j: FACTORS_PER_ADAPTER * (j + 1)]
            width = plan.private_widths[j]
            grads += [
                None if A_p is None or dA[j] is None else dA[j][:width].to(A_p.dtype),
                None if B_p is None or dB[j] is None else dB[j][:, :width].to(B_p.dtype),
                None if A_s is None or dA[j] is None else dA[j][width:].to(A_s.dtype),
                None if B_s is None or dB[j] is None else dB[j][:, width:].to(B_s.dtype),
                None if dD[j] is None else dD[j].to(diag.dtype),
            ]
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return (g if ctx.module_mode else None, dx, None, None, None, *grads)


def _plan(adapters: Sequence[AdapterCall], device, draw_seed) -> tuple[_Plan, list]:
    dropout, factors = [], []
    for call in adapters:
        if len(call.factors) != FACTORS_PER_ADAPTER:
            raise ValueError(f"an adapter takes {FACTORS_PER_ADAPTER} factors (A_private, B_private, A_shared, "
                             f"B_shared, diag), got {len(call.factors)}")
        if call.dropout > 0:
            seed, offset = (call.draw_seed or draw_seed)(device)
            dropout.append((seed, offset, dropout_threshold(call.dropout), dropout_scale(call.dropout)))
        else:
            dropout.append(None)
        factors.extend(call.factors)
    plan = _Plan(slots=tuple(c.slot for c in adapters),
                 private_widths=tuple(0 if c.factors[0] is None else c.factors[0].shape[0] for c in adapters),
                 pool_widths=tuple(0 if c.factors[2] is None else c.factors[2].shape[0] for c in adapters),
                 dropout=tuple(dropout))
    return plan, factors


def fused_linear(x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[AdapterCall],
                 draw_seed=draw_dropout_seed) -> Tensor:
    """``F.linear(x, weight, bias)`` plus every adapter's output in its slot: ``[..., C]``.

    ``weight: [C, a]`` frozen (no gradient; use :func:`fused_accumulate` otherwise). ``draw_seed(device)
    -> (seed, offset)`` draws each dropout mask's Philox key, in adapter order (Megatron's row layers
    pass one that draws inside the tensor-parallel RNG tracker)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("fused_linear runs a frozen base GEMM; the weight (or bias) requires grad: "
                         "compute the base output yourself and use fused_accumulate")
    plan, factors = _plan(adapters, x.device, draw_seed)
    return _FusedRaSAGroup.apply(None, x, weight, bias, plan, *factors)


def fused_base_linear(x: Tensor, weight: Tensor, bias: Tensor | None, adapters: Sequence[AdapterCall]) -> Tensor:
    """``F.linear(x, weight, bias)`` plus the adapters for a caller that runs the base GEMM itself (the
    Megatron wrappers): :func:`fused_linear` for a frozen weight of the input's dtype, else the plain base
    GEMM and :func:`fused_accumulate` (a trainable weight or bias keeps its gradient)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad) or weight.dtype != x.dtype:
        return fused_accumulate(F.linear(x, weight, bias), x, adapters)
    return fused_linear(x, weight, bias, adapters)


def fused_accumulate(base_out: Tensor, x: Tensor, adapters: Sequence[AdapterCall],
                     draw_seed=draw_dropout_seed) -> Tensor:
    """``base_out`` (the base layer's output ``[..., C]``, consumed: updated in place) plus every adapter's
    output; for base layers this path must not bypass (hooks, ZeRO-3, quantized or trainable weights)."""
    if not base_out.is_contiguous():
        base_out = base_out.contiguous()
    if base_out.dtype != x.dtype:
        raise ValueError(f"base output dtype {base_out.dtype} differs from the input's {x.dtype}")
    plan, factors = _plan(adapters, x.device, draw_seed)
    return _FusedRaSAGroup.apply(base_out, x, None, None, plan, *factors)


def runs_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a frozen plain ``nn.Linear`` whose GEMM the fused Function may run itself
    (no hooks, not a ZeRO-3 partitioned or a trainable weight)."""
    from torch.nn.modules import module as module_globals

    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (type(module) is nn.Linear and weight is not None and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and not hasattr(weight, "ds_id")
            and not module._forward_hooks and not module._forward_pre_hooks
            and not module_globals._global_forward_hooks and not module_globals._global_forward_pre_hooks)
