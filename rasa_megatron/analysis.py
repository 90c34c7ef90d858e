"""Reconstruction-error analysis of LoRA vs RaSA (paper §3 and Appendix A), pure torch.

Given ``L`` matrices ``M_i: [b, a]`` (e.g. the weight updates of one module type across layers):

* LoRA's minimum error ``e_lora = Σ_i Σ_{j>r} σ_j(M_i)²`` (Eckart–Young, eq. 9);
* RaSA's error ``Σ_i ||M_i - B_i A_i - B_S diag(d_i) A_S||²_F`` (eq. 11/17, with ``d_i`` acting on
  the shared part only, as in §3), minimised by block coordinate descent (eq. 19, 24-26), started
  from the feasible solution of Theorem 3.1 (eq. 13-15), whose error is exactly ``e_lora``.

Every block update below is an exact minimiser of its block (least squares solved through a
pseudo-inverse), so the error never increases from one iteration to the next.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RaSAFactors:
    """``B_private[i]: [b, r-k]``, ``A_private[i]: [r-k, a]``, ``B_S: [b, Lk]``, ``D: [L, Lk]``, ``A_S: [Lk, a]``."""

    B_private: Tensor
    A_private: Tensor
    B_S: Tensor
    D: Tensor
    A_S: Tensor


def _stack(matrices) -> Tensor:
    matrices = list(matrices)
    if not matrices:
        raise ValueError("need at least one matrix")
    shapes = sorted({tuple(m.shape) for m in matrices})
    if len(shapes) != 1 or len(shapes[0]) != 2:
        raise ValueError(f"all matrices must be 2-D with one shape (RaSA shares ranks across layers); got shapes {shapes}")
    return torch.stack([m.to(torch.float64) for m in matrices])


def _check_ranks(r: int, k: int, b: int, a: int) -> None:
    if r < 1:
        raise ValueError(f"r must be >= 1, got r={r}")
    if not 0 <= k <= r:
        raise ValueError(f"k must satisfy 0 <= k <= r={r}, got k={k}")
    if r > min(a, b):
        raise ValueError(f"r={r} exceeds the matrices' smaller dimension {min(a, b)}")


def lora_reconstruction_error(matrices, r: int) -> float:
    """``e_lora``: the sum over layers of the squared singular values beyond the ``r``-th (eq. 9)."""
    M = _stack(matrices)
    _check_ranks(r, 0, M.shape[1], M.shape[2])
    sigma = torch.linalg.svdvals(M)
    return sigma[:, r:].square().sum().item()


def rasa_reconstruction_error(matrices, factors: RaSAFactors) -> float:
    """``Σ_i ||M_i - B_i A_i - B_S diag(d_i) A_S||²_F`` (eq. 11)."""
    return _residuals(_stack(matrices), factors).square().sum().item()


def _residuals(M: Tensor, f: RaSAFactors) -> Tensor:
    shared = torch.einsum("bp,lp,pa->lba", f.B_S, f.D, f.A_S)
    return M - f.B_private @ f.A_private - shared


def theorem_feasible_solution(matrices, r: int, k: int) -> RaSAFactors:
    """The construction of Theorem 3.1 (eq. 13-15): error exactly ``e_lora``.

    Private factors take SVD components ``1..r-k`` of each ``M_i``; the pool stacks components
    ``r-k+1..r`` of every layer, and ``d_i`` holds layer i's singular values on its own slice.
    """
    M = _stack(matrices)
    L, b, a = M.shape
    _check_ranks(r, k, b, a)
    p = r - k
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    root = S[:, :p].sqrt()
    B_private = U[:, :, :p] * root[:, None, :]
    A_private = root[:, :, None] * Vh[:, :p, :]
    B_S = torch.cat(list(U[:, :, p:r]), dim=1)                     # [b, L k]
    A_S = torch.cat(list(Vh[:, p:r, :]), dim=0)                    # [L k, a]
    D = torch.zeros(L, L * k, dtype=M.dtype)
    for i in range(L):
        D[i, i * k:(i + 1) * k] = S[i, p:r]
    return RaSAFactors(B_private, A_private, B_S, D, A_S)


def _update_private(M: Tensor, f: RaSAFactors, p: int) -> None:
    """Eq. 18-19: best rank-(r-k) approximation of each residual ``M_i - B_S D_i A_S``."""
    target = M - torch.einsum("bp,lp,pa->lba", f.B_S, f.D, f.A_S)
    if p == 0:
        return
    U, S, Vh = torch.linalg.svd(target, full_matrices=False)
    root = S[:, :p].sqrt()
    f.B_private = U[:, :, :p] * root[:, None, :]
    f.A_private = root[:, :, None] * Vh[:, :p, :]


def _update_shared(M: Tensor, f: RaSAFactors) -> None:
    """Eq. 24-26: closed-form least-squares updates of ``B_S``, then ``A_S``, then every ``d_i``."""
    E = M - f.B_private @ f.A_private                                   # [L, b, a]
    G = f.D[:, :, None] * f.A_S[None]                                   # D_i A_S: [L, P, a]
    f.B_S = torch.einsum("lba,lpa->bp", E, G) @ torch.linalg.pinv(torch.einsum("lpa,lqa->pq", G, G), hermitian=True)
    F = f.B_S[None] * f.D[:, None, :]                                   # B_S D_i: [L, b, P]
    f.A_S = torch.linalg.pinv(torch.einsum("lbp,lbq->pq", F, F), hermitian=True) @ torch.einsum("lbp,lba->pa", F, E)
    gram = (f.B_S.T @ f.B_S) * (f.A_S @ f.A_S.T)                         # [P, P]
    rhs = torch.einsum("bp,lba,pa->lp", f.B_S, E, f.A_S)                # diag(B_Sᵀ E_i A_Sᵀ): [L, P]
    f.D = rhs @ torch.linalg.pinv(gram, hermitian=True)


def rasa_coordinate_descent(matrices, r: int, k: int, iterations: int = 20, init: str = "svd",
                            seed: int = 0) -> tuple[list[float], RaSAFactors]:
    """Minimise RaSA's reconstruction error by coordinate descent (Appendix A).

    Args:
        matrices: ``L`` matrices ``[b, a]`` of one shape.
        r, k: rank budget and shared ranks per layer.
        iterations: full sweeps (private parts, then ``B_S``, ``A_S``, ``D``).
        init: ``"svd"`` starts from :func:`theorem_feasible_solution` (error ``e_lora``);
            ``"random"`` from a random pool with unit diagonals.

    Returns:
        ``errors`` (length ``iterations + 1``; ``errors[0]`` is the starting error) and the factors.
    """
    M = _stack(matrices)
    L, b, a = M.shape
    _check_ranks(r, k, b, a)
    if init == "svd":
        factors = theorem_feasible_solution(M, r, k)
    elif init == "random":
        generator = torch.Generator().manual_seed(seed)
        P = L * k
        factors = RaSAFactors(torch.zeros(L, b, r - k, dtype=M.dtype), torch.zeros(L, r - k, a, dtype=M.dtype),
                              torch.randn(b, P, generator=generator, dtype=M.dtype) / b ** 0.5,
                              torch.ones(L, P, dtype=M.dtype),
                              torch.randn(P, a, generator=generator, dtype=M.dtype) / a ** 0.5)
        _update_private(M, factors, r - k)
    else:
        raise ValueError(f"init must be 'svd' or 'random', got {init!r}")
    errors = [_residuals(M, factors).square().sum().item()]
    for _ in range(iterations):
        if k:
            _update_shared(M, factors)
        _update_private(M, factors, r - k)
        errors.append(_residuals(M, factors).square().sum().item())
    return errors, factors
