"""The csrc/ extension's CPU kernels (built into the suite's own CPU torch by tools/env.sh): registered,
bit-identical to the pure-torch Philox oracle, schema-correct (opcheck), traceable by torch.compile; the
RASA_KERNELS / RASA_FUSED switches; the package without the extension. CUDA kernels: tests skip here
(no GPU); tools/gpu_check.sh runs them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rasa_megatron.ops import build, dispatch, philox

ROOT = Path(__file__).resolve().parents[3]
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SEEDS = [(0, 0), (1, 0), ((1 << 40) + 3, (1 << 35) + 1), ((1 << 63) - 1, (1 << 63) - 1)]


@pytest.fixture(scope="module")
def extension():
    path = dispatch.load_extension(build_if_missing=True)
    assert path is not None, "the rasa extension could not be built for this torch"
    return path


def test_every_op_has_a_cpu_kernel(extension):
    for op in build.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rasa::{op}", "CPU"), op
    assert dispatch.has_kernel("cpu")
    manifest = build.read_manifest()
    assert manifest["torch"] == torch.__version__ and manifest["sources_sha256"] == build.source_hash()


@pytest.mark.parametrize("shape", [(1,), (3,), (4,), (5,), (1023,), (7, 13), (2, 3, 33)])
@pytest.mark.parametrize("seed,offset", SEEDS)
def test_keep_mask_kernel_equals_the_oracle(extension, shape, seed, offset):
    x = torch.empty(shape)
    for threshold in (0, philox.dropout_threshold(0.1), philox.dropout_threshold(0.5), 1 << 16):
        kernel = torch.ops.rasa.keep_mask(x, seed, offset, threshold)
        assert kernel.dtype == torch.bool and kernel.shape == x.shape
        assert torch.equal(kernel, philox.keep_mask(x, seed, offset, threshold))
    assert torch.ops.rasa.keep_mask(x, seed, offset, 0).all() and not torch.ops.rasa.keep_mask(x, seed, offset, 1 << 16).any()


@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
def test_dropout_cast_and_masked_add_kernels_are_bit_identical_to_the_fallback(extension, in_dtype, out_dtype):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 11, generator=generator, dtype=torch.float64) * 3).to(in_dtype)
    for seed, offset in SEEDS[1:3]:
        for p in (0.0, 0.1, 0.5):
            args = (seed, offset, philox.dropout_threshold(p), philox.dropout_scale(p))
            kernel = torch.ops.rasa.dropout_cast(x, *args, out_dtype)
            assert kernel.dtype == out_dtype
            assert torch.equal(kernel, philox.dropout_cast(x, *args, out_dtype))
            out = (torch.randn(37, 11, generator=generator, dtype=torch.float64)).to(out_dtype)
            expected = out.clone()
            philox.masked_add_(expected, x, *args)
            torch.ops.rasa.masked_add_(out, x, *args)
            assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_cast_add_kernel_is_bit_identical_to_the_fallback_and_to_its_two_parts(extension, dtype):
    generator = torch.Generator().manual_seed(1)
    x, src, out = ((torch.randn(41, 9, generator=generator, dtype=torch.float64) * 2).to(dtype) for _ in range(3))
    for seed, offset in SEEDS:
        args = (seed, offset, philox.dropout_threshold(0.2), philox.dropout_scale(0.2))
        got_out, want_out = out.clone(), out.clone()
        dropped = torch.ops.rasa.dropout_cast_add_(got_out, src, x, *args, dtype)
        want_dropped = philox.dropout_cast_add_(want_out, src, x, *args, dtype)
        assert torch.equal(dropped, want_dropped) and torch.equal(got_out, want_out)
        parts_out = out.clone()
        torch.ops.rasa.masked_add_(parts_out, src, *args)
        assert torch.equal(got_out, parts_out)
        assert torch.equal(dropped, torch.ops.rasa.dropout_cast(x, *args, dtype))


def test_dropout_cast_matches_its_definition(extension):
    x = torch.randn(1000, 17, dtype=torch.float64)
    p, seed, offset = 0.3, 99, 7
    kept = philox.keep_mask(x, seed, offset, philox.dropout_threshold(p))
    got = torch.ops.rasa.dropout_cast(x, seed, offset, philox.dropout_threshold(p), 1 / (1 - p), torch.float64)
    torch.testing.assert_close(got, torch.where(kept, x / (1 - p), 0.0), rtol=1e-15, atol=0)
    assert abs((~kept).double().mean().item() - p) < 0.01


def test_opcheck_every_op(extension):
    x = torch.randn(6, 10)
    args = (123, 4, philox.dropout_threshold(0.25))
    torch.library.opcheck(torch.ops.rasa.keep_mask.default, (x, *args))
    torch.library.opcheck(torch.ops.rasa.dropout_cast.default, (x, *args, 4 / 3, torch.bfloat16))
    torch.library.opcheck(torch.ops.rasa.masked_add_.default, (torch.randn(6, 10), x, *args, 4 / 3))
    torch.library.opcheck(torch.ops.rasa.dropout_cast_add_.default,
                          (torch.randn(6, 10), torch.randn(6, 10), x, *args, 4 / 3, torch.float32))


def test_kernels_refuse_bad_input_naming_the_value(extension):
    x = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"threshold must be in \[0, 2\^16\], got 65537"):
        torch.ops.rasa.keep_mask(x, 1, 0, (1 << 16) + 1)
    with pytest.raises(RuntimeError, match="seed=-1"):
        torch.ops.rasa.dropout_cast(x, -1, 0, 5, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.rasa.dropout_cast(x.t(), 1, 0, 5, 1.0, torch.float32)
    with pytest.raises(RuntimeError, match="differ in shape"):
        torch.ops.rasa.masked_add_(torch.zeros(4, 6), torch.zeros(6, 4), 1, 0, 5, 1.0)
    with pytest.raises(RuntimeError, match="must have dtype"):
        torch.ops.rasa.dropout_cast_add_(torch.zeros(4, 6), torch.zeros(4, 6), x.double(), 1, 0, 5, 1.0, torch.float32)
    with pytest.raises(ValueError, match=r"seed=-1"):
        philox.keep_mask(x, -1, 0, 5)
    with pytest.raises(ValueError, match="dropout probability must be in"):
        philox.dropout_threshold(1.0)


def test_torch_compile_traces_the_ops_with_their_fake_kernels(extension):
    def f(x):
        return torch.ops.rasa.dropout_cast(x, 11, 3, philox.dropout_threshold(0.5), 2.0, torch.float32) * 2

    x = torch.randn(8, 9)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), f(x))


def _rasa_linear_layer(dropout=0.0):
    from rasa_megatron.layers import RaSALinear
    from rasa_megatron.pool import RankPool

    torch.manual_seed(0)
    base = nn.Linear(16, 12).requires_grad_(False)
    pool = RankPool(16, 12, 1, 2)
    layer = RaSALinear(base, 3, pool, 8.0, dropout=dropout)
    with torch.no_grad():
        layer.B_private.normal_()
        pool.B_shared.normal_()
    return layer, pool


@pytest.mark.parametrize("train", [False, True])
def test_torch_compile_fullgraph_through_the_fused_layer(train):
    layer, pool = _rasa_linear_layer()
    layer.train(train)
    x = torch.randn(3, 5, 16, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    eager_grads = [t.grad.clone() for t in (x, layer.A_private, layer.B_private, layer.diag, pool.A_shared)]
    for t in (x, layer.A_private, layer.B_private, layer.diag, pool.A_shared):
        t.grad = None
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)(x)
    compiled.sum().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip([t.grad for t in (x, layer.A_private, layer.B_private, layer.diag, pool.A_shared)], eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_kernel_and_fallback_give_the_same_training_step(extension, monkeypatch):
    """A dropout layer's output and gradients under RASA_KERNELS=auto (extension) and off (torch Philox):
    bit-identical masks, same values."""
    results = {}
    for mode in ("auto", "off"):
        monkeypatch.setenv("RASA_KERNELS", mode)
        assert dispatch.has_kernel("cpu") == (mode == "auto")
        layer, pool = _rasa_linear_layer(dropout=0.3)
        layer.train()
        x = torch.randn(4, 7, 16, generator=torch.Generator().manual_seed(2), requires_grad=True)
        torch.manual_seed(9)
        y = layer(x)
        y.pow(2).sum().backward()
        results[mode] = [y.detach(), x.grad, layer.A_private.grad, pool.A_shared.grad, layer.diag.grad]
    for got, want in zip(results["auto"], results["off"]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (results["auto"][0] == layer.base_layer(torch.zeros(1, 16))).float().mean() < 0.5  # not all dropped


def test_no_sources_means_no_cached_library_and_no_error(monkeypatch, tmp_path):
    """A wheel install ships no csrc/: the cache lookup finds nothing (and the ops fall back) instead of
    failing on the missing sources; a forced build says what is missing."""
    monkeypatch.setattr(build, "CSRC", tmp_path / "no-csrc")
    assert not build.sources_present() and build.read_manifest() is None
    assert dispatch._cached_library(build_if_missing=False) is None
    with pytest.raises(FileNotFoundError, match="extension sources are not in"):
        build.build(cuda=False, root=tmp_path)


def test_switches_refuse_bad_values(monkeypatch):
    monkeypatch.setenv("RASA_KERNELS", "sometimes")
    with pytest.raises(ValueError, match=r"RASA_KERNELS must be one of \['auto', 'off', 'force'\], got 'sometimes'"):
        dispatch.has_kernel("cpu")
    monkeypatch.setenv("RASA_KERNELS", "force")
    with pytest.raises(RuntimeError, match="no kernel for device meta"):
        dispatch.has_kernel("meta")
    monkeypatch.setenv("RASA_FUSED", "maybe")
    with pytest.raises(ValueError, match="RASA_FUSED must be 0 or 1, got 'maybe'"):
        dispatch.fused_enabled()


def test_reference_path_under_rasa_fused_0(monkeypatch):
    layer, _ = _rasa_linear_layer()
    x = torch.randn(2, 16)
    fused = layer(x)
    monkeypatch.setenv("RASA_FUSED", "0")
    torch.testing.assert_close(layer(x), fused, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.reference_forward(x), fused, rtol=1e-6, atol=1e-6)


def test_package_runs_without_the_extension(tmp_path):
    """An empty extension cache: nothing is loaded or built, the fused path runs on the torch fallback."""
    script = (
        "import torch\n"
        "from rasa_megatron.ops import dispatch\n"
        "from tests.unit.ops.test_kernels import _rasa_linear_layer\n"
        "layer, pool = _rasa_linear_layer(dropout=0.2); layer.train()\n"
        "y = layer(torch.randn(3, 16, requires_grad=True)); y.sum().backward()\n"
        "assert layer.A_private.grad is not None\n"
        "print('RESULT', dispatch.has_kernel('cpu'), dispatch.load_extension(), "
        "torch._C._dispatch_has_kernel_for_dispatch_key.__name__)\n")
    env = {**os.environ, "RASA_EXTENSION_DIR": str(tmp_path / "empty"), "RASA_KERNELS": "auto"}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "RESULT False None" in done.stdout
    assert not (tmp_path / "empty").exists()


def test_build_cli_writes_a_manifest(extension, tmp_path):
    done = subprocess.run([sys.executable, "-m", "rasa_megatron.ops.build", "--cpu-only", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["kernels"] == {op: ["CPU"] for op in build.OPS} and not report["cuda_kernels"]
    assert Path(report["folder"], "rasa_ops.so").exists()
    bad = subprocess.run([sys.executable, "-m", "rasa_megatron.ops.build", "--cuda", "--out", str(tmp_path / "x")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "CPU build" in bad.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (tools/gpu_check.sh runs this)")
def test_cuda_kernels_equal_the_cpu_kernels():
    dispatch.load_extension(build_if_missing=True)
    x = torch.randn(1001, 33)
    for seed, offset in SEEDS:
        threshold = philox.dropout_threshold(0.3)
        assert torch.equal(torch.ops.rasa.keep_mask(x.cuda(), seed, offset, threshold).cpu(),
                           torch.ops.rasa.keep_mask(x, seed, offset, threshold))
