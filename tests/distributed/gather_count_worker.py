"""torchrun worker: count ZeRO-3 all-gathers per parameter over training steps; rank 0 writes JSON.

    torchrun --nproc_per_node 2 gather_count_worker.py RECIPE OUT.json resident|registered
"""
import json
import sys

from rasa_megatron.deepspeed import engine as trainer
from rasa_megatron.training.recipe import load_recipe
from rasa_megatron.deepspeed.zero3 import AllGatherCounter, pool_parameters


def main(recipe_path, out_path, mode):
    recipe = load_recipe(recipe_path)
    state = trainer.setup(recipe, resident_pools=(mode == "resident"))
    # two warm-up steps: DeepSpeed's coordinator records its module trace in the first and only
    # releases by the trace (where persistence applies) once the trace is complete
    trainer.train(state, 0, 2, progress=False)
    steps = 2
    with AllGatherCounter(state.engine.module) as counter:
        trainer.train(state, 2, 2 + steps, progress=False)
    pool_names = {n for n, p in state.engine.module.named_parameters() if any(p is q for q in pool_parameters(state.engine.module))}
    if trainer.world()[0] == 0:
        with open(out_path, "w") as handle:
            json.dump({"steps": steps, "num_layers": state.engine.module.config.num_hidden_layers,
                       "pool": {n: counter.counts[n] for n in sorted(pool_names)},
                       "base": {n: c for n, c in counter.counts.items() if n not in pool_names}}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:4])
