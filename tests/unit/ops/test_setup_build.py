"""setup.py's extension build (flash-attention's conventions): off by default with no top-level torch
import, RASA_FORCE_BUILD=1 + RASA_SKIP_CUDA_BUILD=1 compiles the CPU kernels into the wheel."""
import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def test_setup_py_imports_torch_only_inside_the_forced_build():
    tree = ast.parse((ROOT / "setup.py").read_text())
    top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = {a.name for n in top for a in n.names} | {n.module for n in top if isinstance(n, ast.ImportFrom)}
    assert not any(name and name.split(".")[0] == "torch" for name in names), names


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_forced_build_puts_cpu_kernels_and_a_manifest_in_the_wheel(tmp_path):
    env = {**os.environ, "RASA_FORCE_BUILD": "1", "RASA_SKIP_CUDA_BUILD": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
                           "-w", str(tmp_path), str(ROOT)], env=env, capture_output=True, text=True, timeout=1100)
    assert done.returncode == 0, done.stderr[-4000:]
    wheel = next(tmp_path.glob("rasa_megatron-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        # the lm-eval task files render from the installed package, not from a checkout
        assert {f"rasa_megatron/eval/lm_tasks/{n}" for n in ("rasa_hellaswag.yaml", "rasa_winogrande.yaml",
                "rasa_arc_challenge.yaml", "rasa_task_utils.py")} <= set(names)
        library = next(n for n in names if n.startswith("rasa_megatron/ops/_rasa_ops") and n.endswith(".so"))
        manifest = json.loads(archive.read("rasa_megatron/ops/_rasa_ops.json"))
        archive.extract(library, tmp_path / "unpacked")
    import torch

    assert manifest["torch"] == torch.__version__ and manifest["cuda_kernels"] is False
    probe = ("import sys, torch; torch.ops.load_library(sys.argv[1]); "
             "print(all(torch._C._dispatch_has_kernel_for_dispatch_key('rasa::' + op, 'CPU') "
             "for op in ('keep_mask', 'dropout_cast', 'masked_add_')))")
    loaded = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "unpacked" / library)],
                            capture_output=True, text=True, timeout=300)
    assert loaded.stdout.strip() == "True", loaded.stderr[-3000:]
