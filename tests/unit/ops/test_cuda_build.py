"""Item 4 of the kernels issue: build the extension against a CUDA torch on this GPU-less machine, load it,
and check that every op has a CPU and a CUDA kernel and that the CPU kernels equal the Philox oracle.

The CUDA torch (``torch==2.14.1``, the CUDA 13.0 build on this machine's local package index, ~5 GB) goes
into a separate virtual environment, cached under ``~/.cache/rasa_megatron/cuda-torch-venv`` (override:
``RASA_CUDA_TORCH_VENV``), never into the suite's ``.venv``. ``CUDA_HOME`` (default: the folder above
the ``nvcc`` on PATH) must hold the CUDA 13 toolkit. Numerics on a GPU: tools/gpu_check.sh.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CUDA_TORCH = "torch==2.14.1"

PROBE = r'''
import importlib.util, json, sys
import torch
torch.ops.load_library(sys.argv[1])
spec = importlib.util.spec_from_file_location("philox", sys.argv[2])
philox = importlib.util.module_from_spec(spec); spec.loader.exec_module(philox)
ops = ("keep_mask", "dropout_cast", "masked_add_", "dropout_cast_add_")
keys = {op: [k for k in ("CPU", "CUDA", "Meta") if torch._C._dispatch_has_kernel_for_dispatch_key("rasa::" + op, k)]
        for op in ops}
x = torch.randn(513, 7)
equal = []
for seed, offset in ((0, 0), ((1 << 40) + 3, (1 << 33) + 5)):
    t = philox.dropout_threshold(0.3)
    equal.append(torch.equal(torch.ops.rasa.keep_mask(x, seed, offset, t), philox.keep_mask(x, seed, offset, t)))
    for dtype in (torch.float32, torch.bfloat16):
        equal.append(torch.equal(torch.ops.rasa.dropout_cast(x, seed, offset, t, 1 / 0.7, dtype),
                                 philox.dropout_cast(x, seed, offset, t, 1 / 0.7, dtype)))
    out, ref = torch.zeros(513, 7), torch.zeros(513, 7)
    torch.ops.rasa.masked_add_(out, x, seed, offset, t, 1 / 0.7); philox.masked_add_(ref, x, seed, offset, t, 1 / 0.7)
    equal.append(torch.equal(out, ref))
    d1 = torch.ops.rasa.dropout_cast_add_(out, x, x, seed, offset, t, 1 / 0.7, torch.float32)
    d2 = philox.dropout_cast_add_(ref, x, x, seed, offset, t, 1 / 0.7, torch.float32)
    equal.append(torch.equal(d1, d2) and torch.equal(out, ref))
print("RESULT " + json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "keys": keys, "equal": equal,
                              "cuda_available": torch.cuda.is_available()}))
'''


def _cuda_home() -> str | None:
    from rasa_megatron.ops.build import cuda_toolkit

    return cuda_toolkit()


def _cuda_venv() -> Path:
    venv = Path(os.environ.get("RASA_CUDA_TORCH_VENV") or Path.home() / ".cache" / "rasa_megatron" / "cuda-torch-venv")
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import torch, sys; sys.exit(0 if torch.version.cuda else 3)"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return venv
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", CUDA_TORCH,
                           "setuptools", "numpy"], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        pytest.fail(f"pip install {CUDA_TORCH} into {venv} failed:\n{done.stderr[-3000:]}")
    if subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.fail(f"{CUDA_TORCH} in {venv} is not a CUDA build")
    return venv


@pytest.mark.slow
@pytest.mark.timeout(3000)
def test_extension_builds_against_cuda_torch_with_cpu_and_cuda_kernels(tmp_path):
    cuda_home = _cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit (nvcc) on this machine: set CUDA_HOME")
    python = _cuda_venv() / "bin" / "python"
    env = {**os.environ, "CUDA_HOME": cuda_home, "PATH": f"{cuda_home}/bin:{os.environ['PATH']}"}
    env.pop("RASA_EXTENSION_DIR", None)
    built = subprocess.run([str(python), str(ROOT / "rasa_megatron" / "ops" / "build.py"), "--cuda", "--out", str(tmp_path)],
                           env=env, capture_output=True, text=True, timeout=1800)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-4000:]
    report = json.loads(built.stdout)
    assert report["cuda_kernels"] and report["torch_cuda"].startswith("13.") and report["cuda_arches"] == ["8.0", "9.0+PTX"]
    library = Path(report["folder"]) / "rasa_ops.so"
    cuobjdump = Path(cuda_home) / "bin" / "cuobjdump"
    if cuobjdump.exists():  # SASS for both targets is in the library
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(library)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing, listing
    probe = subprocess.run([str(python), "-c", PROBE, str(library), str(ROOT / "rasa_megatron" / "ops" / "philox.py")],
                           env=env, capture_output=True, text=True, timeout=600)
    assert probe.returncode == 0, probe.stderr[-4000:]
    result = json.loads(probe.stdout.split("RESULT ", 1)[1])
    assert result["cuda"].startswith("13.") and not result["cuda_available"]
    for op, keys in result["keys"].items():
        assert "CPU" in keys and "CUDA" in keys, (op, keys)
    assert all(result["equal"]), result["equal"]
