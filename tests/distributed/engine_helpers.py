"""Helpers for the multi-process engine tests: tiny model configs and checkpoints, recipe writers, the
launcher, metric readers and the adapter comparison."""
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "pretrain_rasa.py"
TINY_LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY_MIXTRAL = dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=49152, hidden_size=32,
                    intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
                    tie_word_embeddings=True, rms_norm_eps=1e-5)


def write_recipe(workspace: Path, out_dir: Path, ds_config: str = "ds_zero3.json", **sections) -> Path:
    """A tiny fp32 recipe (global batch 8, micro-batch 2, 4 steps, RaSA r=4 k=1 + dropout 0)."""
    recipe = {
        "deepspeed": str(ROOT / "examples" / "configs" / ds_config),
        "model": {"config": str(workspace / "tiny_llama.json"), "tokenizer": str(workspace / "tokenizer")},
        "data": {"mode": "sft", "paths": [str(workspace / "sft.jsonl")], "seq_len": 96},
        "adapter": {"method": "rasa", "r": 4, "k": 1, "alpha": 8, "dropout": 0.0},
        "train": {"global_batch_size": 8, "micro_batch_size": 2, "max_steps": 4, "lr": 2e-3, "precision": "fp32",
                  "gradient_checkpointing": True, "seed": 3, "warmup_ratio": 0.25},
        "output": {"dir": str(out_dir)},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = out_dir.parent / f"{out_dir.name}.yaml"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(recipe: Path, nproc: int, *extra: str, launcher: str = "torchrun", timeout: int = 600, check: bool = True):
    """Run examples/pretrain_rasa.py on ``nproc`` CPU processes (gloo) and return the CompletedProcess
    (``check``: raise when it fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    bindir = Path(sys.executable).parent
    if launcher == "torchrun":
        cmd = [str(bindir / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(SCRIPT)]
    else:
        cmd = [str(bindir / "deepspeed"), f"--num_gpus={nproc}", "--master_port", str(_free_port()), str(SCRIPT)]
    proc = subprocess.run(cmd + ["--config", str(recipe), *extra], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_losses(out_dir: Path) -> list[float]:
    return read_metric(out_dir, "loss")


def read_metric(out_dir: Path, column: str) -> list[float]:
    """One column of a run's ``metrics.csv``, per step."""
    import csv

    with open(out_dir / "metrics.csv", newline="") as handle:
        return [float(row[column]) for row in csv.DictReader(handle)]


def tiny_checkpoint(workspace, name="tiny_llama"):
    """A saved tiny model (weights on disk) so both runs start from identical base weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = workspace / name
    if not path.exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(workspace / f"{name}.json"))
        model.save_pretrained(path)
    return str(path)


def make_recipe(workspace, out_dir, ds_config="ds_zero3.json", **sections):
    model = {"path": tiny_checkpoint(workspace), "config": None, "tokenizer": str(workspace / "tokenizer")}
    sections["model"] = {**model, **sections.get("model", {})}
    return write_recipe(workspace, out_dir, ds_config, **sections)


def make_megatron_recipe(workspace, out_dir, **sections):
    """:func:`make_recipe` with ``engine: megatron``."""
    path = make_recipe(workspace, out_dir, **sections)
    path.write_text("engine: megatron\n" + path.read_text().replace("engine: deepspeed", ""))
    return path


def assert_adapters_close(got: dict, want: dict, optimizer: str, peak_lr: float):
    assert set(got) == set(want), f"key mismatch: {sorted(set(got) ^ set(want))[:5]}"
    total = sum(t.numel() for t in want.values())
    off = 0
    for key in want:
        assert got[key].shape == want[key].shape, key
        diff = (got[key].float() - want[key].float()).abs()
        if optimizer == "adamw":
            assert diff.max().item() <= 1e-5, f"{key}: max diff {diff.max().item():.3g}"
        else:
            assert diff.max().item() <= 2 * peak_lr + 1e-6, f"{key}: max diff {diff.max().item():.3g}"
            off += int((diff > 1e-5).sum())
    assert off <= 0.005 * total, f"{off} of {total} adapter elements differ by > 1e-5"
    assert any(t.abs().max() > 0 for k, t in want.items() if "B_" in k), "adapter did not train"
