"""The engine-agnostic training layer both engines share: recipes (recipe.py), data and the batch plan
(data.py), the recipe's HF model (model.py), optimizers and LR schedule (optim.py), seeding and RNG
state (rng.py), metrics (metrics.py), checkpoint directories, manifests and the save protocol
(checkpoint.py), pickle-free durable state files (state_io.py), run identities and finished runs
(identity.py), stop requests and host-side agreement (control.py), the step loop and resume choice
(loop.py) and dry runs (dry_run.py). Imports no engine."""
