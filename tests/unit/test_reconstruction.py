"""Paper §3 / Appendix A: Theorem 3.1 and the coordinate descent, on random high-rank matrices."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rasa_megatron.analysis import (lora_reconstruction_error, rasa_coordinate_descent, rasa_reconstruction_error,
                                    theorem_feasible_solution)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def matrices():
    generator = torch.Generator().manual_seed(0)
    mats = [torch.randn(40, 30, generator=generator, dtype=torch.float64) for _ in range(6)]
    assert all(torch.linalg.matrix_rank(m) == 30 for m in mats)
    return mats


def test_lora_error_is_the_truncated_svd_error(matrices):
    brute = 0.0
    for m in matrices:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        brute += (m - U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]).square().sum().item()
    assert lora_reconstruction_error(matrices, 4) == pytest.approx(brute, rel=1e-10)


@pytest.mark.parametrize("k", [0, 1, 2, 4])
def test_theorem_3_1_feasible_solution_achieves_e_lora(matrices, k):
    factors = theorem_feasible_solution(matrices, r=4, k=k)
    assert factors.B_S.shape == (40, 6 * k) and factors.A_S.shape == (6 * k, 30) and factors.D.shape == (6, 6 * k)
    assert factors.B_private.shape == (6, 40, 4 - k)
    assert rasa_reconstruction_error(matrices, factors) == pytest.approx(lora_reconstruction_error(matrices, 4), rel=1e-9)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_coordinate_descent_is_monotone_and_never_above_e_lora(matrices, k, init):
    e_lora = lora_reconstruction_error(matrices, 4)
    errors, factors = rasa_coordinate_descent(matrices, r=4, k=k, iterations=15, init=init)
    assert len(errors) == 16
    for before, after in zip(errors, errors[1:]):
        assert after <= before * (1 + 1e-9)
    if init == "svd":
        assert errors[0] == pytest.approx(e_lora, rel=1e-9)
    assert errors[-1] <= e_lora * (1 + 1e-9)
    assert rasa_reconstruction_error(matrices, factors) == pytest.approx(errors[-1], rel=1e-9)


def test_sharing_one_rank_beats_lora_on_high_rank_matrices(matrices):
    e_lora = lora_reconstruction_error(matrices, 4)
    errors, _ = rasa_coordinate_descent(matrices, r=4, k=1, iterations=15)
    assert errors[-1] < 0.99 * e_lora


def test_k0_is_exactly_lora(matrices):
    errors, _ = rasa_coordinate_descent(matrices, r=4, k=0, iterations=3)
    assert errors == pytest.approx([lora_reconstruction_error(matrices, 4)] * 4, rel=1e-12)


def test_bad_shapes_and_ranks_are_refused(matrices):
    with pytest.raises(ValueError, match=r"one shape.*\(30, 40\).*\(40, 30\)"):
        lora_reconstruction_error(matrices + [torch.randn(30, 40)], 4)
    with pytest.raises(ValueError, match=r"0 <= k <= r=4, got k=5"):
        rasa_coordinate_descent(matrices, r=4, k=5)
    with pytest.raises(ValueError, match=r"r must be >= 1, got r=0"):
        theorem_feasible_solution(matrices, r=0, k=0)
    with pytest.raises(ValueError, match=r"init must be 'svd' or 'random', got 'zeros'"):
        rasa_coordinate_descent(matrices, r=4, k=1, init="zeros")


def test_cli_random_mode_writes_csv_figures_and_summary(tmp_path):
    out = tmp_path / "recon"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reconstruction.py"), "--random", "5,24,20,20",
                           "--r", "4", "--iterations", "4", "--sweep-iterations", "2", "--k-sweep", "0,1,2,4",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("errors.csv", "fig2_error_vs_iteration.png", "fig3_error_vs_k.png", "summary.json"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    module = summary["modules"]["random"]
    assert set(module["error_vs_k"]) == {"0", "1", "2", "4"}
    assert module["final_error"] <= module["e_lora"] * (1 + 1e-9)
    assert module["error_vs_k"]["0"] == pytest.approx(module["e_lora"], rel=1e-9)


def test_cli_rejects_bad_k(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reconstruction.py"), "--random", "3,8,8,8",
                           "--r", "4", "--k", "6", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "got 6" in proc.stderr
