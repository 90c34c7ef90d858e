"""``rasa-convert``: engine checkpoints -> Hugging Face outputs, and checks of what it wrote.

    rasa-convert megatron-to-hf runs/x/checkpoints --hf-config /models/Llama-3.1-70B \\
        --merged out/merged --adapter out/adapter --peft out/peft --verify --verify-layers 2
    rasa-convert megatron-to-hf runs/x/checkpoints/step0000500 --hf-config DIR --merged OUT --dry-run
    rasa-convert hf-to-megatron /models/Llama-3.1-70B out/llama70b-dist --tp 8 --pp 2 --adapter out/adapter
    rasa-convert check out/merged

megatron-to-hf reads a checkpoint of the Megatron engine (any TP/PP/VPP/EP layout) or of the DeepSpeed
engine in one process (no torchrun), reading only its adapter tensors. --merged streams the base (--base,
default: the run's model.path) tensor by tensor. Outputs appear whole or not at all, each with a
conversion_manifest.json that `check` re-verifies. Exit status: 0 done, 1 --verify or check failed, 2 bad
input or a failed write (nothing written).
"""
from __future__ import annotations

import argparse
import json
import sys


def _megatron_to_hf(args) -> int:
    from ..convert.hf_export import VerificationError, export_engine_checkpoint
    from ..convert.merged import parse_size
    from ..convert.verify import Tolerance

    try:
        report = export_engine_checkpoint(
            args.checkpoint, args.hf_config, merged=args.merged, adapter=args.adapter, peft=args.peft,
            base=args.base, tokenizer=args.tokenizer, tag=args.tag, overwrite=args.overwrite,
            max_shard_size=parse_size(args.max_shard_size), dry_run=args.dry_run, verify=args.verify,
            verify_layers=args.verify_layers, tolerance=Tolerance(args.verify_kl, args.verify_top1, args.verify_atol))
    except VerificationError as err:
        print(f"error: {err}; nothing was written", file=sys.stderr)
        return 1
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report["plan"]))
    if "verify" in report:
        print("verify: " + json.dumps(report["verify"], indent=2))
    if args.dry_run:
        print("dry run: nothing written")
    else:
        print(f"wrote {', '.join(report['written'])}")
    if args.peft:
        print(f"serve the PEFT adapter with vLLM --enable-lora --max-lora-rank {report['vllm_max_lora_rank']} "
              f"(LoRA rank {report['max_lora_rank']})")
    return 0


def _hf_to_megatron(args) -> int:
    from ..megatron.dist_export import hf_to_dist_checkpoint

    try:
        result = hf_to_dist_checkpoint(args.hf_dir, args.out, tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep,
                                       adapter=args.adapter, overwrite=args.overwrite,
                                       make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
                                       dtype=args.dtype, dry_run=args.dry_run)
    except (OSError, KeyError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print("\n".join(result["plan"]))
        return 0
    print(f"wrote the torch_dist checkpoint {args.out} (loads at TP {args.tp} x PP {args.pp} and, resharded, "
          "at any other layout)")
    return 0


def _check(args) -> int:
    from ..convert.output import check_output

    problems = check_output(args.directory)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    print(f"OK {args.directory}: every file matches conversion_manifest.json")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rasa-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("megatron-to-hf", help="an engine checkpoint -> merged HF model / RaSA adapter / PEFT")
    to_hf.add_argument("checkpoint", help="checkpoint root (with 'latest') or a tag directory (step0000500)")
    to_hf.add_argument("--hf-config", required=True, help="the base model's HF directory (config.json)")
    to_hf.add_argument("--merged", help="write the merged HF model (W + ΔW) here")
    to_hf.add_argument("--adapter", help="write the rasa_megatron adapter here")
    to_hf.add_argument("--peft", help="write a PEFT LoRA adapter of rank r-k+Lk here")
    to_hf.add_argument("--base", help="the base weights for --merged / --verify (default: the run's model.path)")
    to_hf.add_argument("--tokenizer", help="copy tokenizer files from here (default: --hf-config, then --base)")
    to_hf.add_argument("--tag", help="checkpoint tag under a root (default: 'latest')")
    to_hf.add_argument("--max-shard-size", default="5GB", help="largest merged shard (default 5GB)")
    to_hf.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    to_hf.add_argument("--dry-run", action="store_true", help="print the plan (files, sizes, memory bound); write nothing")
    to_hf.add_argument("--verify", action="store_true",
                       help="compare the exports' logits with the source model's; exit 1 and write nothing above tolerance")
    to_hf.add_argument("--verify-layers", type=int, help="verify with only the first N decoder layers")
    to_hf.add_argument("--verify-kl", type=float, default=1e-3, help="largest mean KL(source || export) (1e-3)")
    to_hf.add_argument("--verify-top1", type=float, default=0.99, help="smallest top-1 agreement (0.99)")
    to_hf.add_argument("--verify-atol", type=float, default=1e-4,
                       help="largest |Δlogit| for fp32 exports and PEFT (1e-4; not applied to a bf16/fp16 merged model)")
    to_hf.set_defaults(run=_megatron_to_hf)
    to_megatron = commands.add_parser("hf-to-megatron", help="a HF model (+ RaSA adapter) -> a Megatron torch_dist checkpoint")
    to_megatron.add_argument("hf_dir", help="the HF model directory (config.json + safetensors)")
    to_megatron.add_argument("out", help="the checkpoint directory to write")
    for flag in ("--tp", "--pp", "--vpp", "--ep"):
        to_megatron.add_argument(flag, type=int, default=1, help="the layout it is meant for (checked; any loads)")
    to_megatron.add_argument("--adapter", help="a rasa_megatron adapter directory, or a PEFT LoRA (this project's export, or any LoRA as "
                                  "RaSA k = 0), to place into the RaSA layers")
    to_megatron.add_argument("--overwrite", action="store_true", help="replace an existing output")
    to_megatron.add_argument("--make-vocab-size-divisible-by", type=int,
                             help="pad the vocabulary to a multiple of this x --tp (Megatron-LM's option)")
    to_megatron.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                             help="the base weights' dtype (auto: the HF config's dtype, else fp32; the adapter stays fp32)")
    to_megatron.add_argument("--dry-run", action="store_true",
                             help="check the inputs and print the plan (tensors, sizes, memory bound); write nothing")
    to_megatron.set_defaults(run=_hf_to_megatron)
    check = commands.add_parser("check", help="re-verify a conversion output against its manifest")
    check.add_argument("directory")
    check.set_defaults(run=_check)
    args = parser.parse_args(argv)
    if args.command == "megatron-to-hf" and not (args.merged or args.adapter or args.peft):
        to_hf.error("give at least one of --merged, --adapter, --peft")
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
