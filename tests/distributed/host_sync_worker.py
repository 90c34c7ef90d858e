"""torchrun worker: device-to-host reads made by rasa_megatron's own code during DeepSpeed training steps.

``Tensor.item / tolist / __float__ / __int__ / __bool__ / numpy`` are counted when called from a file
of the rasa_megatron package (DeepSpeed's and torch's own reads are theirs). On a GPU each is a host
sync that stalls the step. Rank 0 writes ``{"steps": N, "reads": count, "where": [...]}`` as JSON.

    torchrun --nproc_per_node 2 host_sync_worker.py RECIPE OUT.json
"""
import json
import sys
from collections import Counter
from pathlib import Path

import torch

import rasa_megatron
from rasa_megatron.deepspeed import engine
from rasa_megatron.training.recipe import load_recipe

PACKAGE = str(Path(rasa_megatron.__file__).parent)
READS = ("item", "tolist", "__float__", "__int__", "__bool__", "numpy")


def main(recipe_path, out_path):
    recipe = load_recipe(recipe_path)
    state = engine.setup(recipe)
    engine.train(state, 0, 1, progress=False)  # warm-up step, not counted
    where = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def counted(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(PACKAGE):
                where[f"{Path(caller.co_filename).name}:{caller.co_name}:{name}"] += 1
            return original(self, *args, **kwargs)

        return read

    for name in READS:
        setattr(torch.Tensor, name, counted(name))
    steps = 2
    try:
        engine.train(state, 1, 1 + steps, progress=False)
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    if engine.world()[0] == 0:
        Path(out_path).write_text(json.dumps({"steps": steps, "reads": sum(where.values()), "where": sorted(where)}))


if __name__ == "__main__":
    main(*sys.argv[1:3])
