"""What a checkpoint belongs to, so a resume can refuse another run's: the recipe values the data
position and the adapter depend on, the model (its architecture config and weight files) and the
tokenised data (sha256 of every token and label); and the marker of a finished run.

Each checkpoint holds ``recipe.json`` (the whole recipe), ``run.json`` (this identity) and
``checkpoint.json`` (what the converters read: format version, engine, layout, RaSA config, base
model); a finished run writes ``<output.dir>/complete.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .checkpoint import check_resume_compatible
from .recipe import Recipe
from .state_io import read_json, write_json

RECIPE_FILE = "recipe.json"
RUN_FILE = "run.json"
DESCRIPTION_FILE = "checkpoint.json"
DESCRIPTION_FORMAT, DESCRIPTION_VERSION = "rasa_megatron.checkpoint", 1
COMPLETE_FILE = "complete.json"
#: recipe values a checkpoint's data position and adapter depend on: a resume must keep them
RESUME_KEYS = (("train", "global_batch_size"), ("train", "seed"), ("data", "mode"), ("data", "seq_len"),
               ("data", "group_by_length"), ("adapter", "method"), ("adapter", "r"), ("adapter", "k"),
               ("adapter", "alpha"), ("adapter", "target_modules"), ("adapter", "target_parameters"))
#: and, for a run to count as the same finished run, its length
LENGTH_KEYS = (("train", "max_steps"), ("train", "epochs"))
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "_attn_implementation_autoset"}


def _sampled_digest(path: Path, samples: int = 16, width: int = 1 << 16) -> str:
    """sha256 of ``samples`` evenly spaced ``width``-byte windows of a file and of its size: other weights
    of the same shapes differ here with overwhelming probability, at the cost of reading ~1 MB."""
    size = path.stat().st_size
    sha = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        for i in range(samples):
            handle.seek(max(0, (size - width) * i // max(1, samples - 1)))
            sha.update(handle.read(width))
    return sha.hexdigest()


def _architecture(config) -> dict:
    """A transformers config as a dict without loading-time keys."""
    return {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}


def _sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _model_config(recipe: Recipe) -> dict:
    """The model's architecture config without loading-time keys ({} without a model source)."""
    from transformers import AutoConfig

    m = recipe.model
    source = m.path or m.config
    kwargs = {"gguf_file": m.gguf_file} if m.gguf_file and source == m.path else {}
    return _architecture(AutoConfig.from_pretrained(source, **kwargs)) if source else {}


def hf_config_fingerprint(source: str | os.PathLike) -> str:
    """:func:`config_fingerprint` of a HF config directory (what a converter compares with the run's)."""
    from transformers import AutoConfig

    return _sha256_json(_architecture(AutoConfig.from_pretrained(source)))


def config_fingerprint(recipe: Recipe) -> str:
    """sha256 of the model's architecture config alone (the same model at another path or dtype hashes alike)."""
    return _sha256_json(_model_config(recipe))


def model_fingerprint(recipe: Recipe) -> str:
    """sha256 of the model's architecture config (without loading-time keys) and of its weight files
    (names, sizes and sampled contents): another model, or other weights of the same architecture,
    fingerprint differently."""
    m = recipe.model
    config = _model_config(recipe)
    weights = {}
    if m.path is not None and Path(m.path).is_dir():
        weights = {p.name: _sampled_digest(p) for p in sorted(Path(m.path).iterdir())
                   if p.suffix in (".safetensors", ".bin", ".gguf", ".pt")}
    pretrained = recipe.megatron.pretrained_checkpoint
    if pretrained is not None and Path(pretrained).is_dir():  # the base weights the Megatron engine loads
        weights = {f"pretrained_checkpoint/{p.name}": _sampled_digest(p) for p in sorted(Path(pretrained).iterdir())
                   if p.suffix == ".distcp" or p.name in ("metadata.json", ".metadata")}
    return _sha256_json({"config": config, "weights": weights})


def _recipe_values(recipe_dict: dict, keys) -> dict:
    return {f"{section}.{key}": recipe_dict.get(section, {}).get(key) for section, key in keys}


def run_identity(recipe: Recipe, data_sha256: str) -> dict:
    """The identity a checkpoint records (and a resume must match)."""
    return {"recipe": _recipe_values(recipe.to_dict(), RESUME_KEYS), "model_sha256": model_fingerprint(recipe),
            "config_sha256": config_fingerprint(recipe), "data_sha256": data_sha256}


def checkpoint_description(recipe: Recipe, identity: dict, step: int, layout: dict) -> dict:
    """What ``checkpoint.json`` says of a checkpoint, so converters need no recipe: the format and its
    version, the engine and its layout, the step, the RaSA config (None for full fine-tuning) and the
    base model (path, config hashes)."""
    config = recipe.rasa_config()
    m = recipe.model
    return {"format": DESCRIPTION_FORMAT, "format_version": DESCRIPTION_VERSION, "engine": recipe.engine,
            "step": step, "method": recipe.adapter.method, "rasa_config": None if config is None else config.to_dict(),
            "base_model": {"path": m.path, "config": m.config, "gguf_file": m.gguf_file,
                           "pretrained_checkpoint": recipe.megatron.pretrained_checkpoint,
                           "config_sha256": identity.get("config_sha256"), "model_sha256": identity["model_sha256"]},
            "layout": layout}


def write_run_record(tag_dir: str | os.PathLike, recipe: Recipe, identity: dict, step: int, layout: dict) -> None:
    """``recipe.json``, ``run.json`` and ``checkpoint.json`` into a checkpoint directory (rank 0)."""
    write_json(Path(tag_dir) / RECIPE_FILE, recipe.to_dict())
    write_json(Path(tag_dir) / RUN_FILE, identity)
    write_json(Path(tag_dir) / DESCRIPTION_FILE, checkpoint_description(recipe, identity, step, layout))


def check_resume_identity(tag_dir: str | os.PathLike, identity: dict) -> None:
    """Refuse (SystemExit, before any step) to resume ``tag_dir`` with another model, data set, RaSA
    config, global batch or data shaping, naming each difference."""
    saved = read_json(Path(tag_dir) / RUN_FILE)
    why = f"{tag_dir} was written by another run; its data position and adapter would not match"
    check_resume_compatible(saved["recipe"], identity["recipe"], why)
    check_resume_compatible({"model (config and weight files, sha256)": saved["model_sha256"][:12],
                             "tokenised data (sha256)": saved["data_sha256"][:12]},
                            {"model (config and weight files, sha256)": identity["model_sha256"][:12],
                             "tokenised data (sha256)": identity["data_sha256"][:12]}, why)


def mark_complete(out_dir: str | os.PathLike, recipe: Recipe, step: int) -> None:
    """``<out_dir>/complete.json`` after the final adapter and exports are written (rank 0)."""
    write_json(Path(out_dir) / COMPLETE_FILE, {"step": step, "recipe": recipe.to_dict(),
                                               "model_sha256": model_fingerprint(recipe)})


def completed_step(recipe: Recipe) -> int | None:
    """The step at which this recipe's run finished, when ``complete.json`` says it did with the same
    model (recipe section and fingerprint), data section, data position, adapter and length; else None
    (a changed recipe then resumes as usual, and the resume checks refuse what cannot continue)."""
    path = Path(recipe.output.dir) / COMPLETE_FILE
    if not path.is_file():
        return None
    record = read_json(path)
    saved, current = record["recipe"], recipe.to_dict()
    same = (_recipe_values(saved, RESUME_KEYS + LENGTH_KEYS) == _recipe_values(current, RESUME_KEYS + LENGTH_KEYS)
            and saved.get("model") == current.get("model") and saved.get("data") == current.get("data")
            and record.get("model_sha256") == model_fingerprint(recipe))
    return int(record["step"]) if same else None
