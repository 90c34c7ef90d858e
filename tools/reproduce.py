"""RaSA vs PEFT LoRA vs full fine-tuning on SmolLM2-135M-Instruct (= ``rasa_megatron.cli.reproduce``)."""
import sys

from rasa_megatron.cli.reproduce import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
