"""Turn a DeepSpeed ZeRO-2/3 checkpoint of examples/pretrain_rasa.py into an adapter, a PEFT LoRA
adapter or a merged Hugging Face model, offline and on CPU.

    python tools/zero_checkpoint_export.py runs/x/checkpoints --adapter out/adapter --peft out/peft
    python tools/zero_checkpoint_export.py runs/x/checkpoints/step0000500 --merged out/merged --base /models/Llama

Only the trainable (adapter) parameters are read from the ZeRO shards, as fp32 masters. The
adapter and PEFT outputs need no base weights (the model skeleton is built on the meta device from
--base's config or the run's model config); --merged loads --base and writes W + ΔW with
save_pretrained into a temporary directory that is renamed into place when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _model_skeleton(config_source: str, rasa_config, meta: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from rasa_megatron import apply_rasa

    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_source))
    else:
        model = AutoModelForCausalLM.from_pretrained(config_source, dtype=torch.float32)
    return apply_rasa(model, rasa_config)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint root (with 'latest') or a tag directory")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--adapter", help="write the rasa_megatron adapter here")
    parser.add_argument("--peft", help="write the PEFT LoRA export here")
    parser.add_argument("--merged", help="write the merged HF model here (needs --base)")
    parser.add_argument("--base", help="base HF checkpoint dir (default: the run's model.path / model.config)")
    args = parser.parse_args(argv)
    if not (args.adapter or args.peft or args.merged):
        parser.error("give at least one of --adapter, --peft, --merged")
    from rasa_megatron import RaSAConfig, export_peft_lora, merge_and_unload, save_adapter
    from rasa_megatron.zero3 import adapter_tensors_from_zero_checkpoint, assign_adapter_tensors_, resolve_checkpoint

    try:
        root, tag = resolve_checkpoint(args.checkpoint, args.tag)
        tensors, config_dict = adapter_tensors_from_zero_checkpoint(root, tag)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rasa_config = RaSAConfig.from_dict(config_dict)
    recipe_file = root / tag / "recipe.json"
    run_model = json.loads(recipe_file.read_text())["model"] if recipe_file.is_file() else {}
    config_source = args.base or run_model.get("path") or run_model.get("config")
    if config_source is None or not Path(config_source).exists():
        print(f"error: no model config found (tried {config_source!r}); pass --base DIR", file=sys.stderr)
        return 2
    try:
        if args.adapter or args.peft:
            model = assign_adapter_tensors_(_model_skeleton(config_source, rasa_config, meta=True), tensors)
            if args.adapter:
                save_adapter(model, args.adapter)
            if args.peft:
                export_peft_lora(model, args.peft, base_model_name_or_path=args.base or run_model.get("path"))
        if args.merged:
            if not (args.base or run_model.get("path")):
                parser.error("--merged needs base weights: pass --base DIR")
            model = assign_adapter_tensors_(_model_skeleton(args.base or run_model["path"], rasa_config, meta=False),
                                            tensors)
            merged = merge_and_unload(model)
            target = Path(args.merged)
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
            try:
                merged.save_pretrained(tmp)
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {len(tensors)} adapter tensors from {root / tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
