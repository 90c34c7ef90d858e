"""Counter-based dropout masks in pure torch: the twin of ``csrc/philox.h`` (the tests' oracle) and the
fallback of the ``rasa::`` ops when the extension has no kernel for a tensor's device.

Element ``i`` of a flattened tensor under ``(seed, offset)`` is kept iff its 16 random bits, half
``i & 1`` (low first) of word ``(i & 7) >> 1`` of ``Philox4x32-10(counter=(i>>3 lo, i>>3 hi, offset lo,
offset hi), key=(seed lo, seed hi))``, are ``>= threshold``, ``threshold = floor(p * 2^16)`` (one Philox
call per 8 elements); a kept element is scaled by ``1 / (1 - p)``.
The 32-bit words live in int64 tensors; the 32x32 -> 64-bit products are split into 16-bit halves so
no intermediate exceeds 2^49.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

MASK32 = 0xFFFFFFFF
THRESHOLD_BITS = 16
ELEMENTS_PER_BLOCK = 8
COUNTER_TAG = 1 << 31  # set in the last counter word (csrc/philox.h)
_MUL = (0xD2511F53, 0xCD9E8D57)
_WEYL = (0x9E3779B9, 0xBB67AE85)


def dropout_threshold(p: float) -> int:
    """``floor(p * 2^16)``: the kernels drop an element when its 16 random bits fall below it."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    return int(math.floor(p * (1 << THRESHOLD_BITS)))


def dropout_scale(p: float) -> float:
    """``1 / (1 - p)``, the scale of kept elements (as ``torch.nn.functional.dropout``)."""
    return 1.0 / (1.0 - p)


def _mulhilo(multiplier: int, word: Tensor) -> tuple[Tensor, Tensor]:
    low, high = word & 0xFFFF, word >> 16
    t1, t2 = multiplier * low, multiplier * high  # each < 2^48
    bracket = t1 + ((t2 & 0xFFFF) << 16)  # < 2^49
    return (t2 >> 16) + (bracket >> 32), bracket & MASK32


def philox4x32_10(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: int, k1: int) -> tuple[Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding uint32 words (broadcasting); returns the 4 output words."""
    for _ in range(10):
        hi0, lo0 = _mulhilo(_MUL[0], c0)
        hi1, lo1 = _mulhilo(_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _WEYL[0]) & MASK32, (k1 + _WEYL[1]) & MASK32
    return c0, c1, c2, c3


def random_bits(numel: int, seed: int, offset: int, device=None) -> Tensor:
    """The 16 random bits of each of ``numel`` elements (int64 tensor ``[numel]``)."""
    _check_seed(seed, offset)
    blocks = torch.arange((numel + ELEMENTS_PER_BLOCK - 1) // ELEMENTS_PER_BLOCK, dtype=torch.int64, device=device)
    c0, c1 = blocks & MASK32, blocks >> 32
    c2 = torch.full_like(blocks, offset & MASK32)
    c3 = torch.full_like(blocks, (offset >> 32) | COUNTER_TAG)  # disjoint from torch's / cuRAND's counters
    words = torch.stack(philox4x32_10(c0, c1, c2, c3, seed & MASK32, seed >> 32), dim=1)  # [blocks, 4]
    return torch.stack([words & 0xFFFF, words >> 16], dim=2).reshape(-1)[:numel]


def _check_seed(seed: int, offset: int) -> None:
    if not (0 <= seed < 2 ** 63 and 0 <= offset < 2 ** 63):
        raise ValueError(f"seed and offset must be in [0, 2^63), got seed={seed}, offset={offset}")


def _check_threshold(threshold: int) -> None:
    if not 0 <= threshold <= 1 << THRESHOLD_BITS:
        raise ValueError(f"threshold must be in [0, 2^16], got {threshold}")


def keep_mask(x: Tensor, seed: int, offset: int, threshold: int) -> Tensor:
    """Bool tensor shaped like ``x``: which elements dropout keeps (what ``rasa::keep_mask`` returns)."""
    _check_threshold(threshold)
    return (random_bits(x.numel(), seed, offset, x.device) >= threshold).reshape(x.shape)


def accumulate_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any of ``dtypes`` is, else float32: the kernels' (and the fused path's) arithmetic dtype."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def dropout_cast(x: Tensor, seed: int, offset: int, threshold: int, scale: float, dtype: torch.dtype) -> Tensor:
    """``kept ? x * scale : 0`` computed in float (double for double tensors), rounded once to ``dtype``."""
    acc = accumulate_dtype(x.dtype, dtype)
    kept = keep_mask(x, seed, offset, threshold)
    return torch.where(kept, (x.to(acc) * scale).to(dtype), torch.zeros((), dtype=dtype, device=x.device))


def masked_add_(out: Tensor, src: Tensor, seed: int, offset: int, threshold: int, scale: float) -> None:
    """``out += kept ? src * scale : 0`` in place, elements dropped left untouched."""
    if out.shape != src.shape:
        raise ValueError(f"out {list(out.shape)} and src {list(src.shape)} differ in shape")
    acc = accumulate_dtype(out.dtype, src.dtype)
    kept = keep_mask(out, seed, offset, threshold)
    out.copy_(torch.where(kept, (out.to(acc) + src.to(acc) * scale).to(out.dtype), out))


def dropout_cast_add_(out: Tensor, src: Tensor, x: Tensor, seed: int, offset: int, threshold: int, scale: float,
                      dtype: torch.dtype) -> Tensor:
    """``out += kept ? src * scale : 0`` in place and return ``kept ? x * scale : 0`` (one mask for both;
    ``out``, ``src`` and ``x`` share a dtype, ``dtype``)."""
    if not out.shape == src.shape == x.shape:
        raise ValueError(f"out {list(out.shape)}, src {list(src.shape)} and x {list(x.shape)} differ in shape")
    if not out.dtype == src.dtype == x.dtype == dtype:
        raise ValueError(f"out, src and x must all have dtype {dtype}, got {out.dtype}, {src.dtype}, {x.dtype}")
    acc = accumulate_dtype(dtype)
    kept = keep_mask(x, seed, offset, threshold)
    out.copy_(torch.where(kept, (out.to(acc) + src.to(acc) * scale).to(dtype), out))
    return torch.where(kept, (x.to(acc) * scale).to(dtype), torch.zeros((), dtype=dtype, device=x.device))
