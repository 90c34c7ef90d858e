"""Small seeded files in the benchmarks' Hugging Face schemas, written by the repository itself for
its tests and dry runs. They are labelled ``fixture`` in every report: a score on them says nothing
about a model's quality on the real benchmark."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

#: written beside the fixture files; ``evaluate_lm`` labels scores on a directory holding it as fixtures
FIXTURE_MARKER = "RASA_FIXTURE_DATA"
_THINGS = ["the kettle", "a red kite", "the old piano", "a wooden boat", "the garden gate", "a paper lantern",
           "the library card", "a silver spoon", "the train ticket", "a glass jar", "the winter coat", "a map"]
_PEOPLE = [("Alice", "Bob"), ("Carmen", "David"), ("Elena", "Farouk"), ("Greta", "Hassan"), ("Ivy", "Jonas")]
_ACTIONS = ["opens", "carries", "cleans", "paints", "repairs", "wraps", "measures", "photographs"]


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_lm_fixtures(out_dir: str | os.PathLike, n: int = 8, seed: int = 0) -> dict[str, Path]:
    """``hellaswag.jsonl``, ``winogrande.jsonl``, ``arc_challenge.jsonl`` (``n`` rows each) under
    ``out_dir``, in the schemas of Rowan/hellaswag, allenai/winogrande and allenai/ai2_arc, plus the
    :data:`FIXTURE_MARKER` file that makes every report label them."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = random.Random(seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hellaswag, winogrande, arc = [], [], []
    for i in range(n):
        thing, action = rng.choice(_THINGS), rng.choice(_ACTIONS)
        a, b = rng.choice(_PEOPLE)
        endings = [f"{rng.choice(_ACTIONS)} {rng.choice(_THINGS)} [title] slowly." for _ in range(4)]
        hellaswag.append({"ind": i, "activity_label": "Household chores", "ctx_a": f"{a} {action} {thing}.",
                          "ctx_b": f"then {a.lower()} looks at it and", "ctx": "", "endings": endings,
                          "source_id": f"fixture~{i}", "split": "val", "split_type": "indomain",
                          "label": str(rng.randrange(4))})
        winogrande.append({"sentence": f"{a} lent {thing} to {b} because _ no longer needed it.",
                           "option1": a, "option2": b, "answer": rng.choice(["1", "2"])})
        labels = ["A", "B", "C", "D"]
        arc.append({"id": f"fixture_{i}", "question": f"Which word names what {a} {action}?",
                    "choices": {"text": [rng.choice(_THINGS) for _ in labels], "label": labels},
                    "answerKey": rng.choice(labels)})
    (out / FIXTURE_MARKER).write_text("These files are rasa_megatron test fixtures, not the benchmarks.\n")
    return {"hellaswag": _write(out / "hellaswag.jsonl", hellaswag),
            "winogrande": _write(out / "winogrande.jsonl", winogrande),
            "arc_challenge": _write(out / "arc_challenge.jsonl", arc)}
