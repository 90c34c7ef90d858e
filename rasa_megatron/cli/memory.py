"""``rasa-memory`` (``tools/memory_estimate.py``): per-GPU memory for RaSA / LoRA / full fine-tuning
of a recipe or a model config, without weights.

    rasa-memory --recipe examples/configs/llama3_70b_rasa.yaml
    rasa-memory --model-config examples/configs/models/mixtral_8x7b.json \\
        --method lora --r 16 --nodes 8 --gpus-per-node 8 --seq-len 4096 --micro-batch 1
    rasa-memory --model-config ... --method full --optimizer adamw --compare-deepspeed

Builds the model on the meta device and prints the dry-run table of the recipe's engine (ZeRO
stages and offload for DeepSpeed, the busiest rank of the layout for Megatron) for A100-40GB and
-80GB. With ``--compare-deepspeed`` (ZeRO-3) it also prints DeepSpeed's own estimator.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..training.recipe import AdapterSection, DataSection, ModelSection, Recipe, RecipeError, TrainSection
from ..training.recipe import load_recipe, validate_recipe
from .train import dry_run_report

DEFAULT_DEEPSPEED_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "configs" / "ds_zero3.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rasa-memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--recipe", help="a recipe YAML (its model, adapter, batch and sequence length)")
    source.add_argument("--model-config", help="an HF config JSON")
    parser.add_argument("--method", choices=("rasa", "lora", "full"), default="rasa")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--target-modules", default=None, help="comma-separated (default: the 7 Llama linears)")
    parser.add_argument("--optimizer", choices=("lion", "adamw"), default="lion")
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=192)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--compare-deepspeed", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.recipe:
            recipe = load_recipe(args.recipe)
        else:
            adapter = AdapterSection(method=args.method, r=args.r, k=args.k)
            if args.target_modules:
                adapter.target_modules = args.target_modules.split(",")
            recipe = Recipe(deepspeed=str(DEFAULT_DEEPSPEED_CONFIG), model=ModelSection(config=args.model_config),
                            data=DataSection(seq_len=args.seq_len), adapter=adapter,
                            train=TrainSection(global_batch_size=args.global_batch, micro_batch_size=args.micro_batch,
                                               optimizer=args.optimizer))
        validate_recipe(recipe, world_size=args.nodes * args.gpus_per_node, require_data=False)
    except (RecipeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(dry_run_report(recipe, nodes=args.nodes, gpus_per_node=args.gpus_per_node))
    if args.compare_deepspeed:
        from ..deepspeed.memory import deepspeed_zero3_estimate, model_states_bytes_per_gpu
        from ..training.dry_run import build_meta_model, count_model_params

        counts = count_model_params(build_meta_model(recipe))
        theirs = deepspeed_zero3_estimate(counts, args.nodes, args.gpus_per_node)
        ours = model_states_bytes_per_gpu(counts, args.nodes * args.gpus_per_node, 3, optimizer=recipe.train.optimizer)
        print(f"ZeRO-3 model states per GPU: DeepSpeed's estimator (all params trained with Adam) "
              f"{theirs / 2**30:.2f} GiB; this estimate ({recipe.adapter.method}, {recipe.train.optimizer}) "
              f"{ours / 2**30:.2f} GiB")
    return 0
