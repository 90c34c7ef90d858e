"""``rasa-export`` from a checkout: a DeepSpeed ZeRO-2/3 checkpoint -> the adapter,
a PEFT LoRA adapter or a merged HF model (``rasa_megatron/cli/export.py``; ``--help``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rasa_megatron.cli.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
