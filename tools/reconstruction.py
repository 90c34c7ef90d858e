"""``rasa-reconstruction`` from a checkout: LoRA vs RaSA reconstruction error on real
weight updates (paper §3) (``rasa_megatron/cli/reconstruction.py``; ``--help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rasa_megatron.cli.reconstruction import main, parse_args  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(main())
