"""``rasa-memory`` from a checkout: per-GPU memory of a recipe or a model config,
without weights (``rasa_megatron/cli/memory.py``; ``--help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rasa_megatron.cli.memory import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
