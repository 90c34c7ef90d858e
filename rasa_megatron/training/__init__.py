"""The engine-agnostic training layer both engines share: recipes (recipe.py), data and the batch plan
(data.py), the recipe's HF model (model.py), optimizers and LR schedule (optim.py), seeding and RNG
state (rng.py), metrics (metrics.py), checkpoint directories (checkpoint.py), the step loop (loop.py)
and dry runs (dry_run.py). Imports no engine."""
