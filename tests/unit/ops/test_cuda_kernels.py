"""The CUDA kernels and the fused path on a GPU (skipped without one; tools/gpu_check.sh runs them with
RASA_KERNELS=force after building the extension there). Masks and elementwise results must be
bit-identical to the CPU kernels (the same philox.h; device code built with --fmad=false); the fused
path against the fp64 CPU reference: fp32 to 1e-4 relative (TF32 off), bf16 within 2x the bf16 torch
reference's own error (flash-attention's rule)."""
import pytest
import torch
import torch.nn.functional as F

from rasa_megatron.ops import AdapterCall, dispatch, draw_dropout_seed, fused_linear, philox
from test_fused import SeedCounter, grads_of, group_case, inputs_of, reference  # helpers only

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh)")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@pytest.fixture(scope="module", autouse=True)
def kernels():
    torch.backends.cuda.matmul.allow_tf32 = False
    dispatch.load_extension(build_if_missing=True)
    assert dispatch.has_kernel("cuda") and dispatch.has_kernel("cpu")


@pytest.mark.parametrize("numel", [1, 5, 4096, 10_000_019])
def test_cuda_masks_are_the_cpu_kernels_masks(numel):
    x = torch.empty(numel)
    for seed, offset in [(0, 0), ((1 << 40) + 3, (1 << 35) + 1), ((1 << 63) - 1, 12)]:
        for p in (0.05, 0.5):
            t = philox.dropout_threshold(p)
            assert torch.equal(torch.ops.rasa.keep_mask(x.cuda(), seed, offset, t).cpu(),
                               torch.ops.rasa.keep_mask(x, seed, offset, t))


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_cuda_elementwise_results_are_bit_identical_to_cpu(in_dtype, out_dtype):
    x = (torch.randn(1001, 67, dtype=torch.float64) * 3).to(in_dtype)
    args = (987654321987, 4, philox.dropout_threshold(0.3), 1 / 0.7)
    assert torch.equal(torch.ops.rasa.dropout_cast(x.cuda(), *args, out_dtype).cpu(),
                       torch.ops.rasa.dropout_cast(x, *args, out_dtype))
    out = torch.randn(1001, 67, dtype=torch.float64).to(out_dtype)
    out_cuda = out.cuda()
    torch.ops.rasa.masked_add_(out, x, *args)
    torch.ops.rasa.masked_add_(out_cuda, x.cuda(), *args)
    assert torch.equal(out_cuda.cpu(), out)
    if in_dtype == out_dtype:
        src = torch.randn(1001, 67, dtype=torch.float64).to(in_dtype)
        out_cuda = out.cuda()
        dropped = torch.ops.rasa.dropout_cast_add_(out, src, x, *args, in_dtype)
        dropped_cuda = torch.ops.rasa.dropout_cast_add_(out_cuda, src.cuda(), x.cuda(), *args, in_dtype)
        assert torch.equal(dropped_cuda.cpu(), dropped) and torch.equal(out_cuda.cpu(), out)


def _to(calls, device, dtype):
    return [AdapterCall(tuple(None if f is None else f.detach().to(device, dtype).requires_grad_() for f in c.factors),
                        c.slot, c.dropout) for c in calls]


@pytest.mark.parametrize("layout", ["plain", "qkv"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_fp32_on_cuda_equals_the_fp64_cpu_reference(layout, dropout):
    x64, weight, bias, calls = group_case(3, 3, 4, dropout, layout, seed=4)
    draw = SeedCounter()
    truth = reference(x64, weight, bias, calls, [draw(None) for c in calls if c.dropout > 0])
    replay = iter(draw.drawn)
    x = x64.detach().cuda().float().requires_grad_()
    cuda_calls = _to(calls, "cuda", torch.float32)
    fused = fused_linear(x, weight.cuda().float(), bias.cuda().float(), cuda_calls, draw_seed=lambda d: next(replay))
    torch.testing.assert_close(fused.double().cpu(), truth, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads_of(fused, inputs_of(x, cuda_calls)), grads_of(truth, inputs_of(x64, calls))):
        if want is not None:
            torch.testing.assert_close(got.double().cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_fused_bf16_on_cuda_within_twice_the_bf16_reference_error(dropout):
    x64, weight64, bias64, calls = group_case(3, 5, 3, dropout, "plain", seed=6)
    draw = SeedCounter()
    drawn = [draw(None) for c in calls if c.dropout > 0]
    truth = reference(x64, weight64, bias64, calls, drawn)
    replay = iter(drawn)
    x = x64.detach().cuda().bfloat16().requires_grad_()
    weight, bias = weight64.cuda().bfloat16(), bias64.cuda().bfloat16()
    fp32_calls = _to(calls, "cuda", torch.float32)
    fused = fused_linear(x, weight, bias, fp32_calls, draw_seed=lambda d: next(replay))
    x16 = x64.detach().cuda().bfloat16().requires_grad_()
    bf16_calls = _to(calls, "cuda", torch.bfloat16)
    masks = [philox.keep_mask(x16.reshape(-1, 13), s, o, philox.dropout_threshold(c.dropout))
             for (s, o), c in zip(drawn, [c for c in calls if c.dropout > 0])]
    ref = F.linear(x16, weight, bias)
    it = iter(masks)
    from rasa_megatron.functional import rasa_linear
    columns = ref.shape[-1]
    for call in bf16_calls:
        xin = x16.reshape(-1, 13)
        if call.dropout > 0:
            xin = xin * next(it) * philox.dropout_scale(call.dropout)
        y = rasa_linear(xin, *call.factors).reshape(*x16.shape[:-1], -1)
        ref = ref + F.pad(y, (call.slot.start, columns - call.slot.start - call.slot.width))

    def error(value, want):
        return (value.double().cpu() - want).abs().max().item()

    assert error(fused, truth) <= 2 * error(ref, truth) + 1e-6
    for got, ref_grad, want in zip(grads_of(fused, inputs_of(x, fp32_calls)), grads_of(ref, inputs_of(x16, bf16_calls)),
                                   grads_of(truth, inputs_of(x64, calls))):
        if want is not None:
            assert error(got, want) <= 2 * error(ref_grad, want) + 1e-6


def test_cuda_seed_draws_advance_and_replay():
    torch.cuda.manual_seed(3)
    first, second = draw_dropout_seed("cuda"), draw_dropout_seed("cuda")
    assert first[0] == second[0] and second[1] == first[1] + 4
    torch.cuda.manual_seed(3)
    assert draw_dropout_seed("cuda") == first
