"""The pure math against a dense fp64 reference built rank by rank (sum_j d_j b_j a_jᵀ)."""
import pytest
import torch

from rasa_megatron.config import RaSAConfig
from rasa_megatron.functional import (initial_diag, kaiming_init_, lora_factors, rasa_delta, rasa_linear,
                                      rasa_linear_split)


def random_factors(in_features, out_features, private_rank, pool_rank, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    A_p = rnd(private_rank, in_features) if private_rank else None
    B_p = rnd(out_features, private_rank) if private_rank else None
    A_s = rnd(pool_rank, in_features) if pool_rank else None
    B_s = rnd(out_features, pool_rank) if pool_rank else None
    return A_p, B_p, A_s, B_s, rnd(private_rank + pool_rank)


def rank_by_rank_reference(A_p, B_p, A_s, B_s, d):
    """ΔW = Σ_j d_j · b_j a_jᵀ over private columns first, then pooled ones (paper eq. 5)."""
    cols = [] if A_p is None else [(B_p[:, j], A_p[j]) for j in range(A_p.shape[0])]
    cols += [] if A_s is None else [(B_s[:, j], A_s[j]) for j in range(A_s.shape[0])]
    assert len(cols) == d.numel()
    return sum(d[j] * torch.outer(b, a) for j, (b, a) in enumerate(cols))


# (private_rank, pool_rank): both parts, LoRA-like (k=0), fully shared (k=r)
SHAPE_PATHS = [(7, 4), (8, 0), (0, 32)]


@pytest.mark.parametrize("private_rank,pool_rank", SHAPE_PATHS)
@pytest.mark.parametrize("in_features,out_features", [(24, 40), (40, 16)])
def test_delta_matches_rank_by_rank_reference(private_rank, pool_rank, in_features, out_features):
    factors = random_factors(in_features, out_features, private_rank, pool_rank)
    expected = rank_by_rank_reference(*factors)
    torch.testing.assert_close(rasa_delta(*factors), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("linear", [rasa_linear, rasa_linear_split])
@pytest.mark.parametrize("private_rank,pool_rank", SHAPE_PATHS)
@pytest.mark.parametrize("batch_shape", [(), (5,), (3, 6)])
def test_linear_matches_dense_update(private_rank, pool_rank, batch_shape, linear):
    factors = random_factors(20, 12, private_rank, pool_rank, seed=1)
    x = torch.randn(*batch_shape, 20, dtype=torch.float64)
    out = linear(x, *factors)
    assert out.shape == (*batch_shape, 12)
    torch.testing.assert_close(out, x @ rank_by_rank_reference(*factors).T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("private_rank,pool_rank", SHAPE_PATHS)
def test_linear_gradients_are_exact(private_rank, pool_rank):
    factors = [t.requires_grad_() if t is not None else None for t in random_factors(6, 5, private_rank, pool_rank)]
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    inputs = [x] + [t for t in factors if t is not None]

    def fn(x, *flat):
        it = iter(flat)
        parts = [next(it) if t is not None else None for t in factors]
        return rasa_linear(x, *parts)

    assert torch.autograd.gradcheck(fn, inputs)


def test_lora_factors_fold_diagonal_into_B():
    A_p, B_p, A_s, B_s, d = random_factors(10, 9, 3, 4)
    lora_A, lora_B = lora_factors(A_p, B_p, A_s, B_s, d)
    assert lora_A.shape == (7, 10) and lora_B.shape == (9, 7)
    torch.testing.assert_close(lora_A[:3], A_p)
    torch.testing.assert_close(lora_A[3:], A_s)
    torch.testing.assert_close(lora_B[:, :3], B_p * d[:3])
    torch.testing.assert_close(lora_B[:, 3:], B_s * d[3:])


def test_diag_length_is_checked():
    A_p, B_p, A_s, B_s, d = random_factors(10, 9, 3, 4)
    with pytest.raises(ValueError, match=r"diag must have shape \[7\]"):
        rasa_delta(A_p, B_p, A_s, B_s, d[:5])


def test_initial_diag_follows_eq6():
    d = initial_diag(alpha=16.0, private_rank=7, pool_rank=30)
    assert d.shape == (37,)
    torch.testing.assert_close(d[:7], torch.full((7,), 16.0 / 14))
    torch.testing.assert_close(d[7:], torch.full((30,), 16.0 / 60))
    assert torch.equal(initial_diag(8.0, 0, 4), torch.full((4,), 1.0))
    assert torch.equal(initial_diag(8.0, 4, 0), torch.full((4,), 1.0))


def test_kaiming_matches_torch_lora_init():
    a = torch.empty(64, 400)
    kaiming_init_(a, torch.Generator().manual_seed(3))
    bound = 1.0 / 400 ** 0.5  # kaiming_uniform with a=sqrt(5): bound = 1/sqrt(fan_in)
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / 3 ** 0.5) < 0.02 * bound


@pytest.mark.parametrize("r,expected_k", [(1, 1), (4, 1), (8, 1), (16, 2), (32, 4), (64, 8)])
def test_default_k_is_max_r_over_8_and_1(r, expected_k):
    config = RaSAConfig(r=r)
    assert config.k == expected_k
    assert config.effective_rank(32) == r - expected_k + 32 * expected_k
