"""RaSA / LoRA / full fine-tuning from a YAML recipe with DeepSpeed (ZeRO-2/3) or Megatron-core
(``engine: megatron``): the script form of ``rasa-train`` (see ``rasa_megatron/cli/train.py``).

    deepspeed --num_nodes 8 --num_gpus 8 --hostfile hostfile examples/pretrain_rasa.py \\
        --config examples/configs/llama3_70b_rasa.yaml
    torchrun --nproc_per_node 8 examples/pretrain_rasa.py --config examples/configs/llama3_8b_rasa.yaml
    python examples/pretrain_rasa.py --config examples/configs/llama3_70b_rasa.yaml --dry-run
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rasa_megatron.cli.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
