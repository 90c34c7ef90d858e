"""``rasa-train`` (``examples/pretrain_rasa.py``): RaSA / LoRA / full fine-tuning from a YAML recipe,
with DeepSpeed (ZeRO-2/3, offload) or Megatron-core (TP x PP x EP x DP, ``engine: megatron``,
RaSA/LoRA only).

    deepspeed --num_nodes 8 --num_gpus 8 --hostfile hostfile examples/pretrain_rasa.py \\
        --config examples/configs/llama3_70b_rasa.yaml
    torchrun --nproc_per_node 8 examples/pretrain_rasa.py --config examples/configs/llama3_8b_rasa.yaml
    rasa-train --config examples/configs/llama3_70b_rasa.yaml --dry-run

Override recipe keys on the command line: ``--set train.lr=3e-4 --set data.paths=[a.jsonl]``.
``--resume`` continues from the newest intact checkpoint in ``output.dir/checkpoints`` (or a given path);
``--resume auto`` also starts afresh when there is none. SIGTERM / SIGUSR1 (``output.stop_signals``) or a
STOP file in ``--control-dir`` make every rank finish its step; the run checkpoints and exits with
status 99 (``preempted.json`` says so). Bad recipes (unknown key, batch not divisible by micro-batch x world size, missing data) exit
with status 2 before any model or data is loaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..training.dry_run import dry_run_report as _report
from ..training.identity import completed_step
from ..training.recipe import Recipe, RecipeError, load_recipe, validate_recipe


def engine_module(recipe: Recipe):
    """The engine module that runs ``recipe`` (its ``run``): ``rasa_megatron.deepspeed.engine`` or
    ``rasa_megatron.megatron.engine``."""
    if recipe.engine == "megatron":
        from ..megatron import engine
    else:
        from ..deepspeed import engine
    return engine


def dry_run_report(recipe: Recipe, nodes: int = 8, gpus_per_node: int = 8) -> str:
    """The dry-run report of ``recipe`` with its engine's memory table."""
    if recipe.engine == "megatron":
        from ..megatron.memory import memory_rows
    else:
        from ..deepspeed.memory import memory_rows
    return _report(recipe, memory_rows, nodes=nodes, gpus_per_node=gpus_per_node)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rasa-train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="recipe YAML (examples/configs/*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--dry-run", action="store_true",
                        help="build on the meta device, print parameters, ranks and a memory estimate, exit")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="dry run: GPUs per node")
    parser.add_argument("--nodes", type=int, default=8, help="dry run: nodes")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="latest|auto|PATH",
                        help="resume from the newest intact checkpoint of output.dir (damaged ones are skipped, "
                             "with a warning); 'auto': the same, or start afresh when there is none (requeued "
                             "jobs); PATH: a checkpoints root or one step directory. A finished run exits at once")
    parser.add_argument("--control-dir", default=None,
                        help="where a STOP file asks the run to stop and preempted.json reports that it did "
                             "(default: output.dir)")
    parser.add_argument("--portable", action="store_true",
                        help="with --resume: restore the world-size-independent adapter + optimizer state "
                             "(resume on a different number of GPUs); engine deepspeed, RaSA/LoRA only")
    parser.add_argument("--stop-after", type=int, default=None, help="stop after this global step (tests)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                        help="set by the deepspeed launcher")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    # torch.distributed's deprecation notices for the collectives DeepSpeed calls, once per call site
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    args = parse_args(argv)
    try:
        recipe = load_recipe(args.config, args.overrides)
        if args.dry_run:
            validate_recipe(recipe, world_size=args.nodes * args.gpus_per_node, require_data=False)
            print(dry_run_report(recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node))
            return 0
        validate_recipe(recipe, world_size=int(os.environ.get("WORLD_SIZE", 1)))
    except RecipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.portable and recipe.engine == "megatron":
        print("error: --portable is for engine: deepspeed; engine: megatron resumes on the layout that "
              "wrote the checkpoint", file=sys.stderr)
        return 2
    if args.portable and not args.resume:
        print("error: --portable needs --resume [PATH]", file=sys.stderr)
        return 2
    if args.resume is not None and args.stop_after is None:
        finished = completed_step(recipe)
        if finished is not None:  # a requeued or repeated job: nothing to do, nothing rewritten
            print(f"run complete: {recipe.output.dir} finished at step {finished} (complete.json); nothing to resume")
            return 0
    status = engine_module(recipe).run(recipe, stop_step=args.stop_after, resume=args.resume, portable=args.portable,
                                       control_dir=args.control_dir)
    _close_process_group()
    return status


def _close_process_group() -> None:
    """After a run every rank finished (the engines end on a barrier): tear the process group down so
    that no rank's interpreter exit destroys it with the backend's threads still running (gloo aborts
    with SIGABRT there; NCCL warns of a leaked communicator)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
