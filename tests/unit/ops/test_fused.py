"""The fused autograd path (rasa_megatron.ops.fused) against the reference math (functional.rasa_linear).

fp64 comparisons use 1e-10: both sides compute the same sums in a different order (GEMM blocking,
in-place addmm vs out-of-place add), a few ulps of 1e-16 on values of order 10. bf16 follows
flash-attention's rule: the fused error against fp64 at most 2x the bf16 reference's own error.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

from rasa_megatron.functional import rasa_linear
from rasa_megatron.ops import AdapterCall, OutputSlot, fused_accumulate, fused_linear, philox

TOL64 = dict(rtol=1e-10, atol=1e-10)


class SeedCounter:
    """A deterministic ``draw_seed``: large seeds and offsets (above 2^32) so every Philox word is used."""

    def __init__(self, start=(5 << 33) + 7):
        self.next, self.drawn = start, []

    def __call__(self, device):
        self.next += 0x1_0000_0001
        self.drawn.append((self.next, self.next // 3))
        return self.drawn[-1]


def make_adapter(a, out_rows, private, pool, dtype, generator, requires_grad=True):
    def rand(*shape):
        if 0 in shape:
            return None
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)

    A_p, B_p = rand(private, a), rand(out_rows, private)
    A_s, B_s = rand(pool, a), rand(out_rows, pool)
    diag = (torch.rand(private + pool, generator=generator, dtype=torch.float64) + 0.5).to(dtype).requires_grad_(requires_grad)
    return (A_p, B_p, A_s, B_s, diag)


def reference(x, weight, bias, calls, drawn, base_out=None):
    """Base output plus each adapter's functional.rasa_linear output, placed in its slot (out of place)."""
    out = F.linear(x, weight, bias) if base_out is None else base_out
    lead, columns = out.shape[:-1], out.shape[-1]
    out2 = out.reshape(-1, columns)
    x2 = x.reshape(-1, x.shape[-1])
    draws = iter(drawn)
    for call in calls:
        xin = x2
        if call.dropout > 0:
            seed, offset = next(draws)
            keep = philox.keep_mask(x2, seed, offset, philox.dropout_threshold(call.dropout))
            xin = x2 * keep * philox.dropout_scale(call.dropout)
        y = rasa_linear(xin, *call.factors)
        groups, slot = call.slot.groups, call.slot
        delta = torch.zeros(x2.shape[0], groups, columns // groups, dtype=y.dtype)
        delta = delta.index_add(2, torch.arange(slot.start, slot.start + slot.width),
                                y.reshape(-1, groups, slot.width))
        out2 = out2 + delta.reshape(-1, columns)
    return out2.reshape(*lead, columns)


def group_case(n_adapters, private, pool, dropout, layout, dtype=torch.float64, seed=0):
    """x [2, 5, 13], a frozen weight, and ``n_adapters`` adapters with slots of ``layout``."""
    generator = torch.Generator().manual_seed(seed)
    a = 13
    if layout == "qkv":  # 3 query groups x (2 query heads + k + v) x head_dim 2
        groups, head_dim = 3, 2
        columns = groups * 4 * head_dim
        slots = [OutputSlot(0, 2 * head_dim, groups), OutputSlot(2 * head_dim, head_dim, groups),
                 OutputSlot(3 * head_dim, head_dim, groups)][:n_adapters]
    else:
        widths = [7, 5, 9][:n_adapters]
        columns = sum(widths) + 2  # two columns no adapter writes
        starts = list(itertools.accumulate([0] + widths))[:-1]
        slots = [OutputSlot(s, w) for s, w in zip(starts, widths)]
    x = torch.randn(2, 5, a, generator=generator, dtype=torch.float64).to(dtype).requires_grad_()
    weight = torch.randn(columns, a, generator=generator, dtype=torch.float64).to(dtype)
    bias = torch.randn(columns, generator=generator, dtype=torch.float64).to(dtype)
    calls = [AdapterCall(make_adapter(a, s.groups * s.width, private, pool, dtype, generator), s,
                         dropout if j != 1 else dropout / 2) for j, s in enumerate(slots)]
    return x, weight, bias, calls


def grads_of(value, tensors, seed=11):
    cotangent = torch.randn(value.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    present = [t for t in tensors if t is not None]
    grads = iter(torch.autograd.grad((value * cotangent.to(value.dtype)).sum(), present, allow_unused=True))
    return [None if t is None else next(grads) for t in tensors]


def inputs_of(x, calls):
    return [x] + [f for call in calls for f in call.factors]


@pytest.mark.parametrize("n_adapters", [1, 2, 3])
@pytest.mark.parametrize("private,pool", [(3, 4), (4, 0), (0, 6)], ids=["rasa", "k=0", "k=r"])
@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("mode", ["weight", "module"])
def test_fused_group_equals_reference_fp64(n_adapters, private, pool, dropout, mode):
    x, weight, bias, calls = group_case(n_adapters, private, pool, dropout, "plain")
    draw = SeedCounter()
    if mode == "weight":
        fused = fused_linear(x, weight, bias, calls, draw_seed=draw)
    else:
        fused = fused_accumulate(F.linear(x, weight, bias), x, calls, draw_seed=draw)
    expected = reference(x, weight, bias, calls, draw.drawn)
    torch.testing.assert_close(fused, expected, **TOL64)
    tensors = inputs_of(x, calls)
    for got, want in zip(grads_of(fused, tensors), grads_of(expected, tensors)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, **TOL64)
    assert len(draw.drawn) == sum(call.dropout > 0 for call in calls)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fused_qkv_interleaved_layout_fp64(dropout):
    x, weight, bias, calls = group_case(3, 3, 2, dropout, "qkv")
    draw = SeedCounter()
    fused = fused_linear(x, weight, bias, calls, draw_seed=draw)
    expected = reference(x, weight, bias, calls, draw.drawn)
    torch.testing.assert_close(fused, expected, **TOL64)
    tensors = inputs_of(x, calls)
    for got, want in zip(grads_of(fused, tensors), grads_of(expected, tensors)):
        torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("mode", ["weight", "module"])
def test_gradcheck_fp64(dropout, mode):
    x, weight, bias, calls = group_case(2, 2, 2, dropout, "plain", seed=3)
    tensors = inputs_of(x, calls)
    present = [t for t in tensors if t is not None]

    def run(*values):
        it = iter(values)
        filled = [None if t is None else next(it) for t in tensors]
        x_in, factors = filled[0], filled[1:]
        rebuilt = [AdapterCall(tuple(factors[5 * j: 5 * j + 5]), c.slot, c.dropout) for j, c in enumerate(calls)]
        draw = SeedCounter()  # the same masks on every evaluation
        if mode == "weight":
            return fused_linear(x_in, weight, bias, rebuilt, draw_seed=draw)
        return fused_accumulate(F.linear(x_in, weight, bias), x_in, rebuilt, draw_seed=draw)

    assert torch.autograd.gradcheck(run, present, eps=1e-6, atol=1e-7)


def _bf16_error(value, truth):
    return (value.double() - truth).abs().max().item()


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_bf16_activations_fp32_factors_within_twice_the_bf16_reference_error(dropout):
    """bf16 activations and base with fp32 adapter masters: the fused path casts the factors to bf16."""
    x64, weight64, bias64, calls64 = group_case(3, 5, 3, dropout, "plain", seed=5)
    draw = SeedCounter()
    truth = reference(x64, weight64, bias64, calls64, [(s, o) for s, o in [draw(None) for _ in range(3)]])
    draws_used = [d for d, c in zip(draw.drawn, calls64) if c.dropout > 0]
    x = x64.detach().to(torch.bfloat16).requires_grad_()
    weight, bias = weight64.to(torch.bfloat16), bias64.to(torch.bfloat16)
    calls32 = [AdapterCall(tuple(None if f is None else f.detach().float().requires_grad_() for f in c.factors),
                           c.slot, c.dropout) for c in calls64]
    replay = iter(draws_used)
    fused = fused_linear(x, weight, bias, calls32, draw_seed=lambda device: next(replay))
    calls16 = [AdapterCall(tuple(None if f is None else f.detach().to(torch.bfloat16).requires_grad_() for f in c.factors),
                           c.slot, c.dropout) for c in calls64]
    x16 = x64.detach().to(torch.bfloat16).requires_grad_()
    bf16_reference = reference(x16, weight, bias, calls16, draws_used)
    truth = reference(x64, weight64, bias64, calls64, draws_used)
    assert fused.dtype == torch.bfloat16
    assert _bf16_error(fused, truth) <= 2 * _bf16_error(bf16_reference, truth) + 1e-6
    t64, t32, t16 = inputs_of(x64, calls64), inputs_of(x, calls32), inputs_of(x16, calls16)
    for got, ref16, want in zip(grads_of(fused, t32), grads_of(bf16_reference, t16), grads_of(truth, t64)):
        if want is None:
            continue
        assert got.dtype == (torch.bfloat16 if got.shape == x.shape else torch.float32)  # grads in the param dtype
        assert _bf16_error(got, want) <= 2 * _bf16_error(ref16, want) + 1e-6


def test_fp32_fused_equals_reference_fp32():
    x64, weight, bias, calls = group_case(2, 3, 4, 0.0, "plain", seed=8)
    x = x64.detach().float().requires_grad_()
    calls32 = [AdapterCall(tuple(None if f is None else f.detach().float().requires_grad_() for f in c.factors), c.slot)
               for c in calls]
    fused = fused_linear(x, weight.float(), bias.float(), calls32)
    torch.testing.assert_close(fused, reference(x, weight.float(), bias.float(), calls32, []), rtol=1e-5, atol=1e-5)


def test_drop_fraction_within_one_percent_of_p():
    x = torch.empty(1000, 1001)
    for p in (0.05, 0.1, 0.5, 0.9):
        kept = philox.keep_mask(x, 12345, 6789, philox.dropout_threshold(p))
        assert abs((1 - kept.float().mean().item()) - p) < 0.01


def test_fused_refuses_a_trainable_base_weight_and_bad_factor_count():
    x, weight, bias, calls = group_case(1, 2, 2, 0.0, "plain")
    with pytest.raises(ValueError, match="requires grad"):
        fused_linear(x, weight.requires_grad_(), bias, calls)
    with pytest.raises(ValueError, match="5 factors"):
        fused_linear(x, weight.detach(), bias, [AdapterCall(calls[0].factors[:4], calls[0].slot)])


def test_layer_fused_equals_reference_in_a_tiny_llama(tiny_model_factory, token_batch, randomise_adapter):
    """HF layers (q/k/v/o/gate/up/down) with dropout 0.2: RaSALinear's fused forward vs the reference math
    on the same Philox masks (each layer draws its (seed, offset) from the default generator in module
    order: re-seeding replays them), fp64 loss and every adapter gradient."""
    from rasa_megatron import RaSAConfig, RaSALinear, adapter_state_dict, apply_rasa
    from rasa_megatron.ops import draw_dropout_seed

    model = apply_rasa(tiny_model_factory(dtype=torch.float64), RaSAConfig(r=4, k=1, alpha=8, dropout=0.2))
    model.to(torch.float64)
    randomise_adapter(model)
    model.train()
    params = dict(adapter_state_dict(model))

    def run():
        for p in params.values():
            p.grad = None
        torch.manual_seed(5)
        loss = model(input_ids=token_batch, labels=token_batch).loss
        loss.backward()
        return loss.detach(), {k: p.grad.clone() for k, p in params.items()}

    fused_loss, fused_grads = run()
    layers = [m for m in model.modules() if isinstance(m, RaSALinear)]
    assert all(m.active_dropout == 0.2 and not m.merged for m in layers)
    for module in layers:
        def forward(x, module=module):
            seed, offset = draw_dropout_seed(x.device)
            flat = x.reshape(-1, x.shape[-1])
            keep = philox.keep_mask(flat, seed, offset, philox.dropout_threshold(0.2))
            dropped = (flat * keep * philox.dropout_scale(0.2)).reshape(x.shape)
            return module.base_layer(x) + rasa_linear(dropped, *module._factors())
        module.forward = forward
    ref_loss, ref_grads = run()
    torch.testing.assert_close(fused_loss, ref_loss, **TOL64)
    for key in ref_grads:
        torch.testing.assert_close(fused_grads[key], ref_grads[key], **TOL64, msg=key)
