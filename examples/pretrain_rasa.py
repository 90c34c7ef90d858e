"""RaSA / LoRA / full fine-tuning with DeepSpeed (ZeRO-2/3, offload) or Megatron-core (TP x PP x DP,
``engine: megatron`` in the recipe, RaSA/LoRA only), from a YAML recipe.

    deepspeed --num_nodes 8 --num_gpus 8 --hostfile hostfile examples/pretrain_rasa.py \\
        --config examples/configs/llama3_70b_rasa.yaml
    torchrun --nproc_per_node 8 examples/pretrain_rasa.py --config examples/configs/llama3_8b_rasa.yaml
    python examples/pretrain_rasa.py --config examples/configs/llama3_70b_rasa.yaml --dry-run

Override recipe keys on the command line: ``--set train.lr=3e-4 --set data.paths=[a.jsonl]``.
``--resume`` continues from the latest checkpoint in ``output.dir/checkpoints`` (or a given path).
Bad recipes (unknown key, batch not divisible by micro-batch x world size, missing data) exit
with status 2 before any model or data is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

# torch.distributed's deprecation notices for the collectives DeepSpeed calls, once per call site
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rasa_megatron.recipe import RecipeError, load_recipe, validate_recipe  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (examples/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true",
                        help="build on the meta device, print parameters, ranks and a memory estimate, exit")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="dry run: GPUs per node")
    parser.add_argument("--nodes", type=int, default=8, help="dry run: nodes")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from output.dir/checkpoints (or the given checkpoint dir)")
    parser.add_argument("--portable", action="store_true",
                        help="with --resume: restore the world-size-independent adapter + optimizer state "
                             "(resume on a different number of GPUs); RaSA/LoRA only")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this global step (tests)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        if args.dry_run:
            from rasa_megatron.memory import dry_run_report

            validate_recipe(recipe, world_size=args.nodes * args.gpus_per_node, require_data=False)
            print(dry_run_report(recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node))
            return 0
        validate_recipe(recipe, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if recipe.engine == "megatron":
        if args.portable:
            print("error: --portable is for engine: deepspeed; engine: megatron resumes on the layout that "
                  "wrote the checkpoint", file=sys.stderr)
            return 2
        from rasa_megatron.megatron.trainer import run

        run(recipe, stop_step=args.stop_after, resume=args.resume)
        return 0
    from rasa_megatron import trainer

    if args.portable and not args.resume:
        print("error: --portable needs --resume [PATH]", file=sys.stderr)
        return 2
    state = trainer.setup(recipe)
    start = 0
    if args.resume:
        load = trainer.load_portable_checkpoint if args.portable else trainer.load_checkpoint
        start = load(state, None if args.resume == "latest" else args.resume)
    trainer.train(state, start_step=start, stop_step=args.stop_after)
    if args.stop_after is not None and args.stop_after < state.total_steps:
        trainer.save_checkpoint(state, args.stop_after)
    else:
        trainer.finish(state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
