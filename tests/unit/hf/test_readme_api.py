"""README's "Python API" block, run as written (its one placeholder, the checkpoint path, pointed at a
saved tiny Llama), so the README cannot drift from the code."""
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from rasa_megatron import RaSALinear

README = Path(__file__).resolve().parents[3] / "README.md"
PLACEHOLDER = '"path/to/hf-checkpoint"'


def readme_api_block() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_runs_as_written(tmp_path, monkeypatch, tiny_model_factory):
    code = readme_api_block()
    assert code.count(PLACEHOLDER) == 1, "the README's API block must name its checkpoint with the placeholder"
    base_dir = tmp_path / "tiny_llama"
    tiny_model_factory("llama", seed=0).save_pretrained(base_dir)
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace(PLACEHOLDER, repr(str(base_dir))), str(README), "exec"), namespace)
    # what the block promises: files written, the loaded adapter trained, a plain model at the end
    assert (tmp_path / "out" / "adapter" / "rasa_adapter.safetensors").is_file()
    assert (tmp_path / "out" / "peft" / "adapter_model.safetensors").is_file()
    saved = load_file(tmp_path / "out" / "adapter" / "rasa_adapter.safetensors")
    assert any(t.abs().max() > 0 for k, t in saved.items() if "B_" in k), "the block's training step changed nothing"
    plain = namespace["plain"]
    assert not any(isinstance(m, RaSALinear) for m in plain.modules())
    ids = torch.randint(0, plain.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    base = namespace["AutoModelForCausalLM"].from_pretrained(base_dir).eval()
    with torch.no_grad():
        assert (plain.eval()(ids).logits - base(ids).logits).abs().max() > 1e-6  # W + ΔW, not W
