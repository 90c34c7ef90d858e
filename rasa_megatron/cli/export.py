"""``rasa-export`` (``tools/zero_checkpoint_export.py``): a DeepSpeed ZeRO-2/3 checkpoint of
``rasa-train`` -> the project adapter, a PEFT LoRA adapter or a merged Hugging Face model, offline
and on CPU.

    rasa-export runs/x/checkpoints --adapter out/adapter --peft out/peft
    rasa-export runs/x/checkpoints/step0000500 --merged out/merged --base /models/Llama

Only the trainable (adapter) parameters are read from the ZeRO shards, as fp32 masters. The
adapter and PEFT outputs need no base weights; --merged streams --base (default: the run's
model.path) tensor by tensor and writes W + ΔW (each output staged, manifested, renamed into place;
`rasa-convert check OUT` re-verifies it). Exits 2 with a message when the input does not fit.
"""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rasa-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="checkpoint root (with 'latest') or a tag directory")
    parser.add_argument("--tag", default=None)
    parser.add_argument("--adapter", help="write the rasa_megatron adapter here")
    parser.add_argument("--peft", help="write the PEFT LoRA export here")
    parser.add_argument("--merged", help="write the merged HF model here (needs base weights)")
    parser.add_argument("--base", help="base HF checkpoint dir (default: the run's model.path / model.config)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    if not (args.adapter or args.peft or args.merged):
        parser.error("give at least one of --adapter, --peft, --merged")
    from ..convert.hf_export import export_zero_checkpoint

    try:
        count = export_zero_checkpoint(args.checkpoint, args.adapter, args.peft, args.merged, base=args.base,
                                       tag=args.tag, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {count} adapter tensors from {args.checkpoint}")
    return 0
