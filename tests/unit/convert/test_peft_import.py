"""PEFT LoRA -> RaSA tensors (``convert.peft_import``): this project's PEFT export comes back as RaSA with
its r and k and the same per-layer updates, a plain PEFT LoRA as k = 0; anything else is refused, named.

Tolerance: logits within 1e-5 (fp32: the same update in another factorisation), pooled A rows exact."""
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa, export_peft_lora
from rasa_megatron.adapter import assign_adapter_tensors_
from rasa_megatron.convert.peft_import import rasa_from_peft_lora

CONFIG = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2)
TOKENS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))


def _base():
    torch.manual_seed(0)
    return LlamaForCausalLM(CONFIG).eval()


def _rasa_model(rasa_config):
    model = _base()
    apply_rasa(model, rasa_config)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: every factor non-zero, diagonals of both signs
        for name, param in model.named_parameters():
            if name.endswith(("B_private", "B_shared", "diag")):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def _imported(tensors, rasa_config):
    model = _base()
    apply_rasa(model, rasa_config)
    return assign_adapter_tensors_(model, tensors).eval()


@pytest.mark.parametrize("r,k", [(4, 1), (4, 4), (3, 0)])
def test_a_rasa_peft_export_comes_back_with_its_r_k_and_updates(tmp_path, r, k):
    model = _rasa_model(RaSAConfig(r=r, k=k, alpha=8))
    export_peft_lora(model, tmp_path / "peft")
    tensors, config = rasa_from_peft_lora(tmp_path / "peft")
    assert (config.r, config.k) == (r, k)
    assert sorted(config.target_modules) == sorted(RaSAConfig(r=r, k=k).target_modules)
    original = adapter_state_dict(model)
    for key in original:
        if key.endswith(("A_private", "A_shared")):
            assert torch.equal(tensors[key], original[key]), key
    with torch.no_grad():
        diff = (_imported(tensors, config)(TOKENS).logits - model.eval()(TOKENS).logits).abs().max().item()
    assert diff <= 1e-5


def test_a_plain_peft_lora_comes_back_as_k_0(tmp_path):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param))
    lora.save_pretrained(tmp_path / "lora")
    tensors, config = rasa_from_peft_lora(tmp_path / "lora")
    assert (config.r, config.k, sorted(config.target_modules)) == (4, 0, ["down_proj", "q_proj", "v_proj"])
    with torch.no_grad():
        diff = (_imported(tensors, config)(TOKENS).logits - lora.eval()(TOKENS).logits).abs().max().item()
    assert diff <= 1e-5


def test_what_is_not_a_rasa_lora_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    export_peft_lora(_rasa_model(RaSAConfig(r=4, k=1, alpha=8)), tmp_path / "peft")
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tampered = dict(tensors)
    tampered[key] = tensors[key].clone()
    tampered[key][0, -1] += 1.0  # a pooled column no longer a multiple of the shared one
    save_file(tampered, weights)
    with pytest.raises(ValueError, match=r"self_attn.q_proj: the pooled columns of lora_B are not one shared"):
        rasa_from_peft_lora(tmp_path / "peft")
    save_file({k: v for k, v in tensors.items() if k != key}, weights)
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj lacks lora_A or lora_B"):
        rasa_from_peft_lora(tmp_path / "peft")
    save_file(tensors, weights)
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for change, message in (({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
                            ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "target_parameters"),
                            ({"use_dora": True}, "use_dora is set")):
        config_file.write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            rasa_from_peft_lora(tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match="is not a PEFT LoRA adapter"):
        rasa_from_peft_lora(tmp_path)


def test_hf_to_megatron_refuses_an_expert_adapter_and_writes_nothing(tmp_path, capsys):
    """Experts in torch_dist checkpoints are not written yet: a Mixtral adapter on its experts exits 2,
    naming it, before anything is written."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from rasa_megatron import save_adapter
    from rasa_megatron.cli.convert import main

    config = MixtralConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(config)
    model.save_pretrained(tmp_path / "base")
    apply_rasa(model, RaSAConfig(r=4, k=1, alpha=8, target_modules=("q_proj",),
                                 target_parameters=("mlp.experts.gate_up_proj",)))
    save_adapter(model, tmp_path / "adapter")
    capsys.readouterr()
    assert main(["hf-to-megatron", str(tmp_path / "base"), str(tmp_path / "out"), "--adapter",
                 str(tmp_path / "adapter")]) == 2
    assert "adapts MoE experts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_untrained_pool_stays_trainable_and_a_bf16_export_is_read(tmp_path):
    """A fresh RaSA model (B = 0) exported and read back: every diagonal entry is 1, not 0 (B_S = 0 with
    D = 0 would never get a gradient again). A bf16 export is read within bf16 rounding of its update."""
    fresh = _base()
    apply_rasa(fresh, RaSAConfig(r=4, k=1, alpha=8))
    export_peft_lora(fresh, tmp_path / "fresh")
    tensors, config = rasa_from_peft_lora(tmp_path / "fresh")
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in tensors.items() if k.endswith("diag"))
    model = _rasa_model(RaSAConfig(r=4, k=1, alpha=8)).to(torch.bfloat16)
    export_peft_lora(model, tmp_path / "bf16")
    tensors, config = rasa_from_peft_lora(tmp_path / "bf16")
    assert (config.r, config.k) == (4, 1)
