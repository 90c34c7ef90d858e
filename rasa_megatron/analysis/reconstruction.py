"""Reconstruction error of LoRA vs RaSA (paper §3 and Appendix A): pure fp64 torch math, no I/O.

``L`` matrices ``M_i: [b, a]`` (e.g. one module type's weight updates across the layers) are
approximated either by LoRA, ``B_i A_i`` of rank ``r`` per layer, or by RaSA,
``B_i A_i + B_S D_i A_S`` with a private rank ``r - k`` per layer and a pool of ``P = L k`` ranks
shared by all layers (``D_i`` acts on the shared part only, as in §3, eq. 11). Notation:

* ``B_private: [L, b, r-k]``, ``A_private: [L, r-k, a]``: the layer-specific factors ``B_i, A_i``;
* ``B_S: [b, P]``, ``A_S: [P, a]``: the shared rank pool;
* ``D: [L, P]``: row ``i`` is ``diag(D_i)``, layer i's weighting of the pool.

LoRA's minimum error ``e_lora`` comes from Eckart–Young (eq. 9). RaSA's error is minimised by
block coordinate descent (eq. 19, 24-26), each block update being an exact least-squares minimiser,
so the error never increases; started from the feasible solution of Theorem 3.1 (eq. 13-15) it
starts at exactly ``e_lora``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import torch
from torch import Tensor

Matrices = Union[Tensor, Sequence[Tensor]]


class RaSAFactors(NamedTuple):
    """RaSA's factors for ``L`` layers; unpack into :func:`rasa_reconstruction_error` with ``*``.

    Shapes: ``B_private: [L, b, r-k]``, ``A_private: [L, r-k, a]``, ``B_S: [b, L*k]``,
    ``D: [L, L*k]`` (row ``i`` = ``diag(D_i)``), ``A_S: [L*k, a]``.
    """

    B_private: Tensor
    A_private: Tensor
    B_S: Tensor
    D: Tensor
    A_S: Tensor


def lora_reconstruction_error(matrices: Matrices, r: int) -> float:
    """LoRA's minimum error ``e_lora = Σ_i Σ_{j>r} σ_j(M_i)²`` (eq. 9).

    Args:
        matrices: ``L`` matrices of one shape ``[b, a]`` (a list or an ``[L, b, a]`` tensor).
        r: LoRA rank per layer, ``1 <= r <= min(b, a)``.
    """
    M = _stack(matrices)
    _check_ranks(r, 0, M.shape[1:])
    return torch.linalg.svdvals(M)[:, r:].square().sum().item()


def rasa_reconstruction_error(matrices: Matrices, B_private: Tensor, A_private: Tensor, B_S: Tensor, D: Tensor,
                              A_S: Tensor) -> float:
    """RaSA's error ``Σ_i ||M_i - B_i A_i - B_S D_i A_S||²_F`` (eq. 11/17).

    Args:
        matrices: ``L`` matrices ``[b, a]``.
        B_private: ``[L, b, r-k]``; A_private: ``[L, r-k, a]``.
        B_S: ``[b, P]``; D: ``[L, P]``, row ``i`` = ``diag(D_i)``; A_S: ``[P, a]``.
    """
    M = _stack(matrices)
    factors = RaSAFactors(*(factor.to(torch.float64) for factor in (B_private, A_private, B_S, D, A_S)))
    _check_factors(M, factors)
    return _error(M, factors)


def theorem_feasible_solution(matrices: Matrices, r: int, k: int) -> RaSAFactors:
    """The feasible RaSA solution of Theorem 3.1 (eq. 13-15), whose error equals ``e_lora``.

    With ``M_i = Σ_j σ_j u_j v_jᵀ``: ``B_i A_i`` holds components ``1..r-k`` (the root of each
    ``σ_j`` on either side); the pool stacks every layer's ``u_j`` (into ``B_S``) and ``v_jᵀ`` (into
    ``A_S``) for ``j = r-k+1..r``, layer after layer; ``D_i`` holds layer i's ``σ_j`` on its own
    ``k``-slice of the pool and zeros elsewhere.

    Args:
        matrices: ``L`` matrices ``[b, a]``.
        r: rank budget per layer, ``1 <= r <= min(b, a)``.
        k: ranks each layer gives to the pool, ``0 <= k <= r``.
    """
    M = _stack(matrices)
    _check_ranks(r, k, M.shape[1:])
    L = M.shape[0]
    p = r - k
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:, :p].sqrt()
    B_private = U[:, :, :p] * root[:, None, :]
    A_private = root[:, :, None] * Vh[:, :p, :]
    B_S = U[:, :, p:r].permute(1, 0, 2).reshape(M.shape[1], L * k)      # [b, L k], layer-major
    A_S = Vh[:, p:r, :].reshape(L * k, M.shape[2])                     # [L k, a]
    D = torch.block_diag(*S[:, p:r].unbind(0)) if k else M.new_zeros(L, 0)
    return RaSAFactors(B_private, A_private, B_S, D.reshape(L, L * k), A_S)


def rasa_coordinate_descent(matrices: Matrices, r: int, k: int, iterations: int = 50, init: str = "svd",
                            seed: int = 0) -> tuple[list[float], RaSAFactors]:
    """Minimise RaSA's reconstruction error by block coordinate descent (Appendix A).

    One iteration updates, each to its exact minimiser given the rest: the private factors (eq. 19,
    truncated SVD of ``M_i - B_S D_i A_S``), then ``B_S``, ``A_S`` and all ``D_i`` (eq. 24-26, as
    derived from the zero gradients of eq. 20-23). The error is therefore non-increasing.

    Args:
        matrices: ``L`` matrices of one shape ``[b, a]``.
        r: rank budget per layer, ``1 <= r <= min(b, a)``.
        k: ranks each layer gives to the pool, ``0 <= k <= r`` (``0`` is LoRA, ``r`` has no private part).
        iterations: number of sweeps over the blocks, ``>= 0``.
        init: ``"svd"`` starts from :func:`theorem_feasible_solution` (error ``e_lora``);
            ``"random"`` from a random pool and zero private factors.
        seed: seed of the ``"random"`` start.

    Returns:
        ``(errors, factors)``: ``errors[0]`` is the starting error and ``errors[t]`` the error after
        iteration ``t`` (``iterations + 1`` values); ``factors`` are the final :class:`RaSAFactors`.
    """
    M = _stack(matrices)
    _check_ranks(r, k, M.shape[1:])
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    if init == "svd":
        factors = theorem_feasible_solution(M, r, k)
    elif init == "random":
        factors = _random_start(M, r, k, seed)
    else:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    errors = [_error(M, factors)]
    for iteration in range(iterations):
        if k == 0 and iteration:  # no pool: the first private update is LoRA's optimum, later ones repeat it
            errors.append(errors[-1])
            continue
        factors = _update_private(M, factors)
        if k:
            factors = _update_pool(M, factors)
        errors.append(_error(M, factors))
    return errors, factors


def _stack(matrices: Matrices) -> Tensor:
    """``[L, b, a]`` float64 from ``L`` matrices of one shape; ValueError naming the shapes otherwise."""
    matrices = list(matrices)
    if not matrices:
        raise ValueError("need at least one matrix, got none")
    shapes = [tuple(matrix.shape) for matrix in matrices]
    if any(len(shape) != 2 for shape in shapes) or len(set(shapes)) != 1:
        raise ValueError(f"all matrices must be 2-D with one shape (RaSA shares ranks across layers); "
                         f"got shapes {sorted(set(shapes))}")
    return torch.stack([matrix.detach().to(torch.float64) for matrix in matrices])


def _check_ranks(r: int, k: int, shape: Sequence[int]) -> None:
    if r < 1:
        raise ValueError(f"r must be >= 1, got r={r}")
    if r > min(shape):
        raise ValueError(f"r must be <= min(b, a) = {min(shape)} for matrices of shape {tuple(shape)}, got r={r}")
    if not 0 <= k <= r:
        raise ValueError(f"k must satisfy 0 <= k <= r={r}, got k={k}")


def _check_factors(M: Tensor, f: RaSAFactors) -> None:
    L, b, a = M.shape
    p, P = f.B_private.shape[-1], f.B_S.shape[-1]
    expected = {"B_private": (L, b, p), "A_private": (L, p, a), "B_S": (b, P), "D": (L, P), "A_S": (P, a)}
    for name, shape in expected.items():
        if tuple(getattr(f, name).shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for matrices [L={L}, b={b}, a={a}], "
                             f"got {tuple(getattr(f, name).shape)}")


def _shared_part(f: RaSAFactors) -> Tensor:
    """``B_S D_i A_S`` for every layer: ``[L, b, a]``."""
    return (f.B_S * f.D[:, None, :]) @ f.A_S


def _error(M: Tensor, f: RaSAFactors) -> float:
    return (M - f.B_private @ f.A_private - _shared_part(f)).square().sum().item()


def _random_start(M: Tensor, r: int, k: int, seed: int) -> RaSAFactors:
    """Zero private factors and a random pool of unit-variance entries scaled like ``M``."""
    L, b, a = M.shape
    P = L * k
    generator = torch.Generator().manual_seed(seed)
    scale = (M.square().mean().sqrt().item() / max(P, 1) ** 0.5) ** (1 / 3)

    def randn(*shape):
        return torch.randn(*shape, generator=generator, dtype=M.dtype) * scale

    return RaSAFactors(M.new_zeros(L, b, r - k), M.new_zeros(L, r - k, a), randn(b, P), randn(L, P), randn(P, a))


def _update_private(M: Tensor, f: RaSAFactors) -> RaSAFactors:
    """Eq. 18-19: ``B_i A_i`` = best rank-(r-k) approximation of ``M_i - B_S D_i A_S``, ``Σ^½`` on each side.

    The top singular subspace comes from the eigendecomposition of the residual's Gram matrix in
    its smaller dimension (much cheaper than a full SVD of ``[b, a]``); projecting onto it and a
    small ``[r-k, ·]`` SVD give the truncated SVD exactly.
    """
    p = f.B_private.shape[-1]
    if p == 0:
        return f
    residual = M - _shared_part(f)                                          # [L, b, a]
    wide = residual.shape[1] <= residual.shape[2]
    R = residual if wide else residual.mT                                   # [L, n, m], n <= m
    top = torch.linalg.eigh(R @ R.mT).eigenvectors[..., -p:]                 # [L, n, p]
    U, S, Vh = torch.linalg.svd(top.mT @ R, full_matrices=False)            # [L,p,p] [L,p] [L,p,m]
    root = S.sqrt()
    left = (top @ U) * root[:, None, :]                                     # [L, n, p]
    right = root[:, :, None] * Vh                                           # [L, p, m]
    if wide:
        return f._replace(B_private=left, A_private=right)
    return f._replace(B_private=right.mT, A_private=left.mT)


def _update_pool(M: Tensor, f: RaSAFactors) -> RaSAFactors:
    """Eq. 24-26, the exact block minimisers (zero gradients of eq. 20-22), with ``R_i = M_i - B_i A_i``.

    ``B_S = [Σ_i R_i A_Sᵀ D_i] [Σ_i D_i A_S A_Sᵀ D_i]⁺``,
    ``A_S = [Σ_i D_i B_Sᵀ B_S D_i]⁺ [Σ_i D_i B_Sᵀ R_i]``,
    ``diag(D_i) = ((B_Sᵀ B_S) ⊙ (A_S A_Sᵀ))⁺ diag(B_Sᵀ R_i A_Sᵀ)``,
    applied in this order. ``Σ_i D_i X D_i = X ⊙ (Dᵀ D)`` for the stacked diagonals ``D: [L, P]``.
    """
    R = M - f.B_private @ f.A_private                                       # [L, b, a]
    weights = f.D.mT @ f.D                                                  # Σ_i d_i d_iᵀ: [P, P]
    numerator = torch.einsum("lbp,lp->bp", R @ f.A_S.mT, f.D)
    B_S = _solve_psd(f.A_S @ f.A_S.mT * weights, numerator.mT).mT
    B_S_T_R = B_S.mT @ R                                                    # [L, P, a]
    A_S = _solve_psd(B_S.mT @ B_S * weights, torch.einsum("lp,lpa->pa", f.D, B_S_T_R))
    D = _solve_psd((B_S.mT @ B_S) * (A_S @ A_S.mT), torch.einsum("lpa,pa->pl", B_S_T_R, A_S)).mT
    return f._replace(B_S=B_S, A_S=A_S, D=D)


def _solve_psd(gram: Tensor, rhs: Tensor) -> Tensor:
    """Minimum-norm solution ``gram⁺ rhs`` of the normal equations ``gram X = rhs`` (gram ``[P, P]`` PSD).

    Uses the pseudo-inverse, so a singular gram (pool larger than the matrices' rank, an unused
    pool slot) is safe: any solution of the normal equations is a least-squares minimiser.
    """
    return torch.linalg.pinv(gram, hermitian=True) @ rhs
