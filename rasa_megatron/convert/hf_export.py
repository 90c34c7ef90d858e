"""An engine checkpoint -> Hugging Face outputs (``rasa-convert megatron-to-hf``), in one process, no
torch.distributed: the project's RaSA adapter, a PEFT LoRA adapter of rank ``r-k+Lk``, a merged model
streamed tensor by tensor (:mod:`.merged`).

The checkpoint describes itself (RaSA config, base model, layout: ``checkpoint.json``, else
``recipe.json``), so no recipe is needed; only the HF config directory of the base (``--hf-config``)
and, for the merged model, its weights (``--base``, default the base path the checkpoint records).
The inputs are checked before the first byte is written; every output is staged beside its target and renamed into place only when all
outputs are complete (and verified, with ``verify``), with a ``conversion_manifest.json``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import export_peft_lora, hf_model_with_adapter, save_adapter
from ..config import RaSAConfig
from ..inject import rasa_layers
from ..training.checkpoint import MANIFEST as CHECKPOINT_MANIFEST, resolve_checkpoint, verify_checkpoint
from ..training.identity import DESCRIPTION_FILE, RECIPE_FILE, hf_config_fingerprint
from ..training.state_io import read_json
from .dist_checkpoint import adapter_from_dist_checkpoint, is_dist_checkpoint
from .megatron_checkpoint import LAYOUT_FILE, adapter_from_megatron_checkpoint
from .merged import DEFAULT_MAX_SHARD_SIZE, human_size, plan_merged, write_merged
from .output import refuse_existing, refuse_overlapping, staged_outputs
from .zero_checkpoint import adapter_tensors_from_zero_checkpoint
from .verify import Tolerance, truncated_config, verify_exports



class VerificationError(RuntimeError):
    """An export's logits differ from the source model's beyond the tolerance (nothing was written)."""


@dataclass
class EngineCheckpoint:
    """An engine checkpoint read offline: its fp32 adapter tensors (HF ``adapter_state_dict`` keys), RaSA
    config, recipe (a dict) and what describes it (engine, tag directory, layout)."""

    tensors: dict[str, torch.Tensor]
    rasa_config: RaSAConfig | None  # None: a base-only torch_dist checkpoint
    recipe: dict
    description: dict = field(default_factory=dict)

    @property
    def adapter_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def read_engine_checkpoint(path: str | os.PathLike, tag: str | None = None) -> EngineCheckpoint:
    """The adapter of a Megatron-engine (any TP/PP/VPP/EP layout) or DeepSpeed-engine checkpoint (root
    with ``latest`` or a tag directory, its files first checked against the checkpoint's manifest), or of
    a Megatron distributed checkpoint (``torch_dist``, or a Megatron-LM save root) with RaSA keys.
    Raises FileNotFoundError / ValueError naming what is missing, damaged or not a RaSA checkpoint."""
    if is_dist_checkpoint(path) or (Path(path) / "latest_checkpointed_iteration.txt").is_file():
        return _read_dist_checkpoint(path)
    root, tag = resolve_checkpoint(path, tag)
    tag_dir = root / tag
    # the engines' checkpoints carry a manifest; DeepSpeed's own (or older) ones have none to check
    problems = verify_checkpoint(tag_dir) if (tag_dir / CHECKPOINT_MANIFEST).is_file() else []
    if problems:
        raise ValueError(f"{tag_dir} is damaged or incomplete ({len(problems)} problems): {'; '.join(problems[:4])}")
    if is_dist_checkpoint(tag_dir):  # the Megatron engine's output.save_format: torch_dist
        return _read_dist_checkpoint(tag_dir)
    stored_config = None
    if (tag_dir / LAYOUT_FILE).is_file():
        tensors, recipe = adapter_from_megatron_checkpoint(tag_dir)
        layout = read_json(tag_dir / LAYOUT_FILE)
        engine = "megatron"
    else:
        tensors, stored_config = adapter_tensors_from_zero_checkpoint(root, tag)
        recipe = read_json(tag_dir / RECIPE_FILE) if (tag_dir / RECIPE_FILE).is_file() else {}
        layout, engine = {}, "deepspeed"
    description = read_json(tag_dir / DESCRIPTION_FILE) if (tag_dir / DESCRIPTION_FILE).is_file() else {}
    config_dict = description.get("rasa_config") or stored_config
    if config_dict is None:
        from ..training.recipe import recipe_from_dict

        config = recipe_from_dict(recipe, where=str(tag_dir / RECIPE_FILE)).rasa_config()
        if config is None:
            raise ValueError(f"{tag_dir} is a full fine-tuning checkpoint: it has no adapter to convert")
    else:
        config = RaSAConfig.from_dict(config_dict)
    return EngineCheckpoint(tensors, config, recipe,
                            {"checkpoint": str(tag_dir), "engine": engine, "layout": layout,
                             "base_model": description.get("base_model", {})})


def _read_dist_checkpoint(path) -> EngineCheckpoint:
    """A ``torch_dist`` checkpoint: its adapter, and its RaSA config from ``checkpoint.json`` when this
    project wrote one beside it, else from the adapter's shapes."""
    tensors, derived, directory = adapter_from_dist_checkpoint(path, allow_no_adapter=True)
    description = read_json(directory / DESCRIPTION_FILE) if (directory / DESCRIPTION_FILE).is_file() else {}
    config = RaSAConfig.from_dict(description["rasa_config"]) if description.get("rasa_config") and tensors else derived
    return EngineCheckpoint(tensors, config, {}, {"checkpoint": str(directory), "engine": "torch_dist",
                                                  "layout": description.get("layout", {}),
                                                  "base_model": description.get("base_model", {})})


def _dist_base_weights(path, hf_config):
    """The base weights a torch_dist checkpoint holds (None when it holds none: the HF base is needed)."""
    from transformers import AutoConfig

    from .dist_checkpoint import DistBaseWeights

    try:
        return DistBaseWeights(path, AutoConfig.from_pretrained(hf_config))
    except ValueError as err:
        if "holds no base weights" in str(err):
            return None
        raise


def _max_lora_rank(model) -> int:
    return max(unit.effective_rank for unit in rasa_layers(model).values())


def export_engine_checkpoint(checkpoint: str | os.PathLike, hf_config: str | os.PathLike, *, merged=None,
                             adapter=None, peft=None, base=None, tokenizer=None, tag=None, overwrite=False,
                             max_shard_size: int = DEFAULT_MAX_SHARD_SIZE, dry_run=False, verify=False,
                             verify_layers: int | None = None, tolerance: Tolerance = Tolerance(),
                             progress=True) -> dict:
    """Convert an engine checkpoint (see :func:`read_engine_checkpoint`) into the requested outputs.

    Returns ``{"plan": [lines], "max_lora_rank": R, "written": [...], "verify": {...}}``. Raises
    FileExistsError (an output exists, no ``overwrite``), FileNotFoundError / ValueError (input that
    does not fit, named), VerificationError (``verify`` above ``tolerance``) before any output appears."""
    outputs = {name: Path(p) for name, p in (("merged", merged), ("adapter", adapter), ("peft", peft)) if p}
    if not outputs:
        raise ValueError("give at least one output: --merged, --adapter or --peft")
    if len(set(outputs.values())) != len(outputs):
        raise ValueError(f"outputs must be different directories, got {', '.join(map(str, outputs.values()))}")
    refuse_overlapping(outputs.values(), [checkpoint, hf_config, *([base] if base else [])])
    if verify_layers is not None and not verify:
        raise ValueError("--verify-layers bounds --verify; give --verify too")
    if verify and not (merged or peft):
        raise ValueError("--verify compares the --merged and --peft exports with the source model; give one of them")
    for target in outputs.values():
        refuse_existing(target, overwrite)
    hf_config = Path(hf_config)
    if not (hf_config / "config.json").is_file():
        raise FileNotFoundError(f"--hf-config {hf_config} has no config.json")
    source = read_engine_checkpoint(checkpoint, tag)
    if source.rasa_config is None and (adapter or peft):
        raise ValueError(f"{source.description['checkpoint']} holds no RaSA adapter: only --merged (its base "
                         "weights as a HF model) can be written")
    try:
        model = (None if source.rasa_config is None else
                 hf_model_with_adapter(str(hf_config), source.rasa_config, source.tensors))
    except Exception as err:  # noqa: BLE001 - transformers' config validation raises its own types
        raise ValueError(f"the checkpoint's adapter does not fit the model of --hf-config {hf_config}: {err}") from err
    run_model = source.recipe.get("model", {})
    base_dir = base or run_model.get("path") or source.description.get("base_model", {}).get("path")
    base_weights = None  # a torch_dist checkpoint's own base weights: they are the model (--base then only verifies)
    if source.description["engine"] == "torch_dist" and merged:
        base_weights = _dist_base_weights(source.description["checkpoint"], hf_config)
    pretrained = source.description.get("base_model", {}).get("pretrained_checkpoint")
    if merged and base_weights is None and base is None and pretrained:  # the weights the run trained on
        base_weights = _dist_base_weights(pretrained, hf_config)
    if verify and verify_layers is not None:
        truncated_config(hf_config, verify_layers)  # the range, before anything is written
    needs_base = verify or (merged and base_weights is None)
    if needs_base and (base_dir is None or not Path(base_dir).is_dir()):
        raise FileNotFoundError(f"the base model's HF weights are needed for {'--verify' if verify else '--merged'}: "
                                f"{base_dir!r} is not a directory; pass --base")
    plan = (plan_merged(model, base_weights or base_dir, hf_config, tokenizer, max_shard_size) if merged else None)
    rank = _max_lora_rank(model) if model is not None else 0
    what = (f"RaSA r={source.rasa_config.r} k={source.rasa_config.k}" if source.rasa_config else "no adapter")
    lines = [f"source: {source.description['engine']} checkpoint {source.description['checkpoint']} "
             f"({len(source.tensors)} adapter tensors, {human_size(source.adapter_bytes)}, {what})"]
    if base_weights is not None:
        lines.append(f"base weights: the torch_dist checkpoint {base_weights.path} (read one layer at a time)")
    recorded = source.description.get("base_model", {}).get("config_sha256")
    if recorded and recorded != hf_config_fingerprint(hf_config):
        lines.append(f"warning: the config in --hf-config {hf_config} differs from the one the run recorded "
                     f"(sha256 {recorded[:12]}); the shapes fit, but check it is the model that was trained")
    if adapter:
        lines.append(f"adapter -> {outputs['adapter']}: rasa_config.json + rasa_adapter.safetensors")
    if peft:
        lines.append(f"peft -> {outputs['peft']}: LoRA rank {rank} (vLLM: --max-lora-rank {_vllm_rank(rank)})")
    if plan is not None:
        lines.append(f"merged -> {outputs['merged']}:")
        lines += ["  " + line for line in plan.describe(source.adapter_bytes)]
    report = {"plan": lines, "max_lora_rank": rank, "vllm_max_lora_rank": _vllm_rank(rank), "written": [],
              "adapter_tensors": len(source.tensors)}
    if dry_run:
        return report
    manifest_source = {k: v for k, v in source.description.items() if v}
    manifest_source["hf_config"] = str(hf_config)
    base_source = base_weights.path if base_weights is not None else base_dir  # where the merged base is read
    if base_source:
        manifest_source["base"] = str(base_source)
    inputs = [source.description["checkpoint"], hf_config, *([str(base_source)] if base_source else [])]
    with staged_outputs(outputs, manifest_source, overwrite, inputs) as staged:
        if adapter:
            save_adapter(model, staged["adapter"])
        if peft:
            export_peft_lora(model, staged["peft"], base_model_name_or_path=str(base_dir) if base_dir else None)
        if plan is not None:
            write_merged(model, plan, staged["merged"], progress=progress)
        if verify:
            merged_dtype = {plan.base.dtype[k] for k in plan.updates} if plan is not None else set()
            merged_tol = Tolerance(tolerance.max_kl, tolerance.min_top1,
                                   tolerance.atol if merged_dtype <= {"F32", "F64"} else None)
            result = verify_exports(model, base_dir, staged.get("merged"), staged.get("peft"), verify_layers,
                                    tolerance, merged_tol)
            report["verify"] = result
            failed = [name for name in ("merged", "peft") if name in result and not result[name]["passed"]]
            if failed:
                raise VerificationError(f"--verify failed for {', '.join(failed)}: " + "; ".join(
                    f"{n}: {_metrics(result[n])}" for n in failed))
        report["written"] = [str(t) for t in outputs.values()]
    return report


def _vllm_rank(rank: int) -> int:
    """The smallest of vLLM's supported ``--max-lora-rank`` values that holds ``rank``."""
    for supported in (1, 8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= supported:
            return supported
    return rank


def _metrics(m: dict) -> str:
    return f"max|Δlogit| {m['max_abs_diff']:.3g}, KL {m['kl']:.3g}, top-1 {m['top1_agreement']:.4f}"


def export_zero_checkpoint(checkpoint: str | os.PathLike, adapter_dir=None, peft_dir=None, merged_dir=None,
                           base: str | None = None, tag: str | None = None, overwrite: bool = False) -> int:
    """Write the requested outputs of a ZeRO checkpoint (root with ``latest`` or a tag directory) through
    :func:`export_engine_checkpoint` (staged, manifested outputs; the
    merged model streamed from the base's files).

    ``base``: the base HF checkpoint dir (default: the run's ``model.path`` / ``model.config`` from
    the checkpoint's ``recipe.json``); ``merged_dir`` needs base weights. Raises FileNotFoundError /
    ValueError naming what is missing or does not fit, before writing anything. Returns the number
    of adapter tensors exported."""
    if not (adapter_dir or peft_dir or merged_dir):
        raise ValueError("give at least one output: an adapter, a PEFT or a merged directory")
    root, tag = resolve_checkpoint(checkpoint, tag)
    recipe_file = root / tag / RECIPE_FILE
    run_model = read_json(recipe_file)["model"] if recipe_file.is_file() else {}
    config_source = base or run_model.get("path") or run_model.get("config")
    if config_source is None or not Path(config_source).exists():
        raise FileNotFoundError(f"no model config found (tried {config_source!r}); pass the base model directory")
    weights = base or run_model.get("path")
    if merged_dir and not weights:
        raise ValueError("a merged model needs base weights: pass the base model directory")
    report = export_engine_checkpoint(root / tag, config_source, merged=merged_dir, adapter=adapter_dir,
                                      peft=peft_dir, base=weights, overwrite=overwrite)
    return report["adapter_tensors"]
