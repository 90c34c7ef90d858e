"""The RaSA math as pure functions on tensors (no modules, no distributed code).

Notation (paper eq. 2-5), for one linear layer ``W: [b, a]`` (``b = out_features``,
``a = in_features``) of layer ``i`` among ``L`` layers of the same module type:

* ``A_private: [r-k, a]`` and ``B_private: [b, r-k]`` — the layer's own ranks (``A_i``, ``B_i``);
* ``A_shared: [L*k, a]`` and ``B_shared: [b, L*k]`` — the pool shared by all ``L`` layers
  (``A_S``, ``B_S``);
* ``diag: [r-k+L*k]`` — the layer's trainable diagonal ``D_i``, private entries first.

The update is ``ΔW_i = [B_private | B_shared] · diag(D_i) · [A_private ; A_shared]``.
Either part may be ``None`` (``k = 0``: no pool; ``k = r``: no private ranks).
:func:`lora_factors` and :func:`rasa_delta` also take a leading experts dimension (``A_private:
[E, r-k, a]``, ``B_private: [E, b, r-k]``, ``diag: [E, r-k+L*k]``, ...) for stacked MoE expert weights.
Every other path in the project (layers, merge, export, parallel layers, kernels) calls these
functions or is tested against them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _private_width(A_private: Tensor | None) -> int:
    return 0 if A_private is None else A_private.shape[-2]


def _check_factors(A_private, B_private, A_shared, B_shared, diag) -> None:
    if (A_private is None) != (B_private is None) or (A_shared is None) != (B_shared is None):
        raise ValueError("A and B of the private part (and of the pool) must both be given or both be None")
    if A_private is None and A_shared is None:
        raise ValueError("RaSA needs a private part, a pool, or both; got neither")
    width = _private_width(A_private) + (0 if A_shared is None else A_shared.shape[-2])
    lead = (A_private if A_private is not None else A_shared).shape[:-2]
    if diag.shape != (*lead, width):
        raise ValueError(f"diag must have shape {[*lead, width]} (private + pooled ranks), got {list(diag.shape)}")


def concat_factors(A_private: Tensor | None, B_private: Tensor | None, A_shared: Tensor | None,
                   B_shared: Tensor | None) -> tuple[Tensor, Tensor]:
    """``[A_private ; A_shared]: [..., R, a]`` and ``[B_private | B_shared]: [..., b, R]`` (no copy when
    one part is absent)."""
    A_parts = [t for t in (A_private, A_shared) if t is not None]
    B_parts = [t for t in (B_private, B_shared) if t is not None]
    lora_A = A_parts[0] if len(A_parts) == 1 else torch.cat(A_parts, dim=-2)
    lora_B = B_parts[0] if len(B_parts) == 1 else torch.cat(B_parts, dim=-1)
    return lora_A, lora_B


def rasa_linear(
    x: Tensor,
    A_private: Tensor | None,
    B_private: Tensor | None,
    A_shared: Tensor | None,
    B_shared: Tensor | None,
    diag: Tensor,
) -> Tensor:
    """Adapter output ``x · ΔWᵀ`` without forming ΔW.

    The factors are concatenated, ``[A_private ; A_shared]: [R, a]`` and ``[B_private | B_shared]:
    [b, R]`` (``R = r-k+L*k``), and applied as two GEMMs. The concatenation copies ``R (a + b)``
    numbers per call, the adapter's size and not the activations' (for SmolLM2's MLP: 78k numbers
    against 1.2M in one ``[tokens, b]`` output of a 768-token batch); the copy-free alternative, one
    GEMM chain per part plus an add, reads the input and writes the output twice: on CPU its training
    step measured 1.283x the frozen base's against 1.074x for this form (bench/step_time.py, the
    figures in README).

    Args:
        x: ``[..., a]`` adapter input (dropout already applied).
        A_private: ``[r-k, a]`` or None.  B_private: ``[b, r-k]`` or None.
        A_shared: ``[L*k, a]`` or None.   B_shared: ``[b, L*k]`` or None.
        diag: ``[r-k+L*k]``.

    Returns:
        ``[..., b]``.
    """
    lora_A, lora_B = concat_factors(A_private, B_private, A_shared, B_shared)
    return F.linear(F.linear(x, lora_A) * diag, lora_B)


def rasa_linear_split(
    x: Tensor,
    A_private: Tensor | None,
    B_private: Tensor | None,
    A_shared: Tensor | None,
    B_shared: Tensor | None,
    diag: Tensor,
) -> Tensor:
    """Same value as :func:`rasa_linear` with no factor copy: one GEMM chain per part, summed
    (kept for the benchmark's comparison)."""
    width = _private_width(A_private)
    out = None
    if A_private is not None:
        out = F.linear(F.linear(x, A_private) * diag[:width], B_private)
    if A_shared is not None:
        pooled = F.linear(F.linear(x, A_shared) * diag[width:], B_shared)
        out = pooled if out is None else out + pooled
    return out


def lora_factors(
    A_private: Tensor | None,
    B_private: Tensor | None,
    A_shared: Tensor | None,
    B_shared: Tensor | None,
    diag: Tensor,
) -> tuple[Tensor, Tensor]:
    """The update as a plain LoRA pair of rank ``R = r-k+L*k`` with the diagonal folded into B.

    Returns:
        ``lora_A: [R, a] = [A_private ; A_shared]`` and
        ``lora_B: [b, R] = [B_private | B_shared] · diag(D)``, so ``ΔW = lora_B · lora_A``
        (``[E, R, a]`` and ``[E, b, R]`` for stacked expert factors).
    """
    _check_factors(A_private, B_private, A_shared, B_shared, diag)
    lora_A, lora_B = concat_factors(A_private, B_private, A_shared, B_shared)
    return lora_A, lora_B * diag.to(lora_B.dtype).unsqueeze(-2)


def rasa_delta(
    A_private: Tensor | None,
    B_private: Tensor | None,
    A_shared: Tensor | None,
    B_shared: Tensor | None,
    diag: Tensor,
) -> Tensor:
    """Dense update ``ΔW = [B_private | B_shared] · diag(D) · [A_private ; A_shared]``: ``[b, a]``
    (``[E, b, a]`` for stacked expert factors)."""
    lora_A, lora_B = lora_factors(A_private, B_private, A_shared, B_shared, diag)
    return lora_B @ lora_A


def initial_diag(alpha: float, private_rank: int, pool_rank: int, dtype=torch.float32) -> Tensor:
    """Paper eq. 6: ``α/(2(r-k))`` on the ``r-k`` private entries, ``α/(2Lk)`` on the ``Lk`` pooled ones."""
    parts = []
    if private_rank:
        parts.append(torch.full((private_rank,), alpha / (2 * private_rank), dtype=dtype))
    if pool_rank:
        parts.append(torch.full((pool_rank,), alpha / (2 * pool_rank), dtype=dtype))
    return torch.cat(parts)


def kaiming_init_(A: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Kaiming-uniform init of a down-projection ``A: [rank, a]`` exactly as LoRA/PEFT do (``a=√5``)."""
    return torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
