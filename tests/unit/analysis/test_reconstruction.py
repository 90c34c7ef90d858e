"""Paper §3 / Appendix A on random full-rank matrices: Theorem 3.1, coordinate descent, the CLI."""
import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rasa_megatron.analysis import (lora_reconstruction_error, rasa_coordinate_descent, rasa_reconstruction_error,
                                    theorem_feasible_solution)

ROOT = Path(__file__).resolve().parents[3]
NUM_LAYERS, ROWS, COLS, RANK = 6, 40, 30, 4


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: threading only adds overhead (and stalls badly on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def matrices():
    generator = torch.Generator().manual_seed(0)
    mats = [torch.randn(ROWS, COLS, generator=generator, dtype=torch.float64) for _ in range(NUM_LAYERS)]
    assert all(torch.linalg.matrix_rank(m) == COLS for m in mats)
    return mats


@pytest.fixture(scope="module")
def e_lora(matrices):
    return lora_reconstruction_error(matrices, RANK)


def test_e_lora_equals_brute_force_truncated_svd(matrices, e_lora):
    brute_force = 0.0
    for m in matrices:
        U, S, Vh = torch.linalg.svd(m, full_matrices=False)
        brute_force += torch.linalg.matrix_norm(m - U[:, :RANK] @ torch.diag(S[:RANK]) @ Vh[:RANK]).item() ** 2
    assert e_lora == pytest.approx(brute_force, rel=1e-10)
    assert 0 < e_lora < sum(m.square().sum().item() for m in matrices)


@pytest.mark.parametrize("k", [0, 1, 2, RANK])
def test_theorem_3_1_feasible_solution_reaches_e_lora(matrices, e_lora, k):
    factors = theorem_feasible_solution(matrices, RANK, k)
    pool = NUM_LAYERS * k
    assert [tuple(f.shape) for f in factors] == [(NUM_LAYERS, ROWS, RANK - k), (NUM_LAYERS, RANK - k, COLS),
                                                 (ROWS, pool), (NUM_LAYERS, pool), (pool, COLS)]
    if k:  # eq. 14: layer i weights only its own k-slice of the pool
        own_slice = torch.block_diag(*[torch.ones(1, k, dtype=torch.bool)] * NUM_LAYERS)
        assert torch.all(factors.D[~own_slice] == 0) and torch.all(factors.D[own_slice] > 0)
    assert rasa_reconstruction_error(matrices, *factors) == pytest.approx(e_lora, rel=1e-9)


def test_reconstruction_error_sees_every_factor(matrices, e_lora):
    """A wrong pool weighting must change the error (the error function is not a tautology)."""
    B_private, A_private, B_S, D, A_S = theorem_feasible_solution(matrices, RANK, 1)
    assert rasa_reconstruction_error(matrices, B_private, A_private, B_S, D.roll(1, dims=0), A_S) > 1.01 * e_lora
    assert rasa_reconstruction_error(matrices, B_private, A_private, B_S, 0 * D, A_S) > 1.01 * e_lora


def _assert_non_increasing(errors):
    for step, (before, after) in enumerate(zip(errors, errors[1:])):
        assert after <= before * (1 + 1e-9), f"error rose at iteration {step + 1}: {before} -> {after}"


@pytest.mark.parametrize("orientation", ["tall", "wide"])
@pytest.mark.parametrize("k", [1, 2, RANK])
def test_coordinate_descent_from_theorem_is_monotone_and_never_above_e_lora(matrices, e_lora, k, orientation):
    mats = matrices if orientation == "tall" else [m.T for m in matrices]
    errors, factors = rasa_coordinate_descent(mats, RANK, k, iterations=12)
    assert len(errors) == 13
    assert errors[0] == pytest.approx(e_lora, rel=1e-9)
    _assert_non_increasing(errors)
    assert errors[-1] <= e_lora * (1 + 1e-9)
    assert rasa_reconstruction_error(mats, *factors) == pytest.approx(errors[-1], rel=1e-12)


@pytest.mark.parametrize("k", [1, 2, RANK])
def test_coordinate_descent_from_random_start_is_monotone(matrices, k):
    errors, factors = rasa_coordinate_descent(matrices, RANK, k, iterations=12, init="random", seed=3)
    _assert_non_increasing(errors)
    assert errors[-1] < 0.5 * errors[0]
    assert rasa_reconstruction_error(matrices, *factors) == pytest.approx(errors[-1], rel=1e-12)


def test_sharing_one_rank_beats_lora(matrices, e_lora):
    errors, _ = rasa_coordinate_descent(matrices, RANK, 1, iterations=12)
    assert errors[-1] < 0.99 * e_lora


@pytest.mark.parametrize("orientation", ["tall", "wide"])
@pytest.mark.parametrize("init", ["svd", "random"])
def test_k0_is_exactly_lora(matrices, e_lora, init, orientation):
    """From zero private factors ("random"), one private update must be the exact truncated SVD."""
    mats = matrices if orientation == "tall" else [m.T for m in matrices]
    errors, factors = rasa_coordinate_descent(mats, RANK, 0, iterations=3, init=init)
    assert errors[1:] == pytest.approx([e_lora] * 3, rel=1e-12)
    assert factors.B_S.shape[1] == 0 and factors.D.shape == (NUM_LAYERS, 0)


def test_bad_shapes_and_ranks_raise_naming_the_value(matrices):
    with pytest.raises(ValueError, match=r"\(30, 40\).*\(40, 30\)"):
        lora_reconstruction_error(matrices + [torch.randn(COLS, ROWS)], RANK)
    with pytest.raises(ValueError, match=r"\(40, 31\)"):
        rasa_coordinate_descent(matrices[:-1] + [torch.randn(ROWS, COLS + 1)], RANK, 1)
    with pytest.raises(ValueError, match=r"got k=5"):
        rasa_coordinate_descent(matrices, RANK, 5)
    with pytest.raises(ValueError, match=r"got k=-1"):
        theorem_feasible_solution(matrices, RANK, -1)
    with pytest.raises(ValueError, match=r"got r=0"):
        lora_reconstruction_error(matrices, 0)
    with pytest.raises(ValueError, match=r"got r=31"):
        theorem_feasible_solution(matrices, 31, 1)
    with pytest.raises(ValueError, match=r"'zeros'"):
        rasa_coordinate_descent(matrices, RANK, 1, init="zeros")
    with pytest.raises(ValueError, match=r"D must have shape .* got \(6, 5\)"):
        B_private, A_private, B_S, D, A_S = theorem_feasible_solution(matrices, RANK, 1)
        rasa_reconstruction_error(matrices, B_private, A_private, B_S, D[:, :5], A_S)


def _load_cli():
    spec = importlib.util.spec_from_file_location("reconstruction_cli", ROOT / "tools" / "reconstruction.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_random_mode_writes_csv_figures_and_summary(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "reconstruction.py"), "--random", "5,16,12,12",
                           "--r", "4", "--iterations", "4", "--threads", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    for name in ("errors.csv", "fig2_error_vs_iteration.png", "fig3_error_vs_k.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "errors.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["module", "k", "iteration", "error", "e_lora"]
    assert len(rows) == 5 * 5  # k = 0..4 (default sweep), iterations 0..4
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["k"] == 1 and list(summary["mean_ratio_vs_k"]) == ["0", "1", "2", "3", "4"]
    module = summary["modules"]["random"]
    assert module["error_vs_k"]["0"] == pytest.approx(module["e_lora"], rel=1e-9)
    assert module["e_rasa"] < module["e_lora"]


@pytest.mark.parametrize("args, message", [
    (["--random", "3,8,8,8", "--r", "4", "--k", "6"], "got 6"),
    (["--random", "3,8,8,8", "--r", "4", "--k-sweep", "0,9"], "got [9]"),
    (["--random", "3,8,8,8", "--modules", "q_proj,qq_proj"], "qq_proj"),
    (["--random", "3,8,8"], "'3,8,8'"),
    (["--random", "3,8,6,6", "--r", "7"], "--r=7"),
])
def test_cli_rejects_bad_values(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _load_cli().parse_args(args)
    assert exit_info.value.code != 0 and message in capsys.readouterr().err


def test_cli_missing_checkpoints_are_named(tmp_path, monkeypatch):
    cli = _load_cli()
    monkeypatch.chdir(tmp_path)  # no runs/full/model here
    with pytest.raises(SystemExit, match=r"runs/full/model.*--method full --name full"):
        cli.main(["--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="absent"):
        cli.main(["--after", str(tmp_path), "--before", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])


def _save_tiny_llama(path, seed, perturb=0.0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2), **overrides})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(perturb * torch.randn_like(param))
    model.save_pretrained(path)
    return model


def test_cli_checkpoint_mode_uses_per_layer_weight_differences(tmp_path):
    before = _save_tiny_llama(tmp_path / "before", seed=0)
    after = _save_tiny_llama(tmp_path / "after", seed=0, perturb=0.01)
    cli = _load_cli()
    cli.main(["--before", str(tmp_path / "before"), "--after", str(tmp_path / "after"), "--r", "4", "--iterations",
              "3", "--k-sweep", "0,1", "--modules", "k_proj,down_proj", "--out", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert list(summary["modules"]) == ["self_attn.k_proj", "mlp.down_proj"]
    deltas = [a.mlp.down_proj.weight.double() - b.mlp.down_proj.weight.double()
              for a, b in zip(after.model.layers, before.model.layers)]
    down = summary["modules"]["mlp.down_proj"]
    assert down["shape"] == [32, 48] and down["num_layers"] == 3
    assert down["e_lora"] == pytest.approx(lora_reconstruction_error(deltas, 4), rel=1e-6)
    assert down["e_rasa"] < down["e_lora"]

    _save_tiny_llama(tmp_path / "other", seed=0, intermediate_size=40)
    with pytest.raises(SystemExit, match=r"\(48, 32\).*\(40, 32\)"):
        cli.main(["--before", str(tmp_path / "before"), "--after", str(tmp_path / "other"), "--out", str(tmp_path)])
