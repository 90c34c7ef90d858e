"""save_adapter / load_adapter round trips and interop with real PEFT LoRA."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from rasa_megatron import (RaSAConfig, adapter_state_dict, apply_rasa, export_peft_lora, load_adapter,
                           rasa_layers, save_adapter)
from rasa_megatron.adapter import CONFIG_FILE, WEIGHTS_FILE

FAMILIES = ["llama", "mistral", "qwen2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path, tiny_model_factory, token_batch, randomise_adapter):
    model = apply_rasa(tiny_model_factory(family), RaSAConfig(r=4, k=1, alpha=8, dropout=0.05))
    randomise_adapter(model)
    with torch.no_grad():
        expected = model(token_batch).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    meta = json.loads((tmp_path / "adapter" / CONFIG_FILE).read_text())
    assert meta["format_version"] == 1 and meta["rasa_config"]["k"] == 1 and meta["rasa_config"]["dropout"] == 0.05
    assert meta["base_model"]["model_type"] == family
    assert meta["module_types"]["mlp.down_proj"] == {"in_features": 48, "out_features": 32, "layer_indices": [0, 1, 2, 3]}

    loaded = load_adapter(tiny_model_factory(family), tmp_path / "adapter")
    saved = adapter_state_dict(model)
    restored = adapter_state_dict(loaded)
    assert set(saved) == set(restored)
    for key in saved:
        assert torch.equal(saved[key], restored[key]), key
    with torch.no_grad():
        assert torch.equal(loaded(token_batch).logits, expected)
    assert all(p.requires_grad == (n in restored) for n, p in loaded.named_parameters())


def test_save_overwrites_atomically_and_leaves_no_temp(tmp_path, tiny_model_factory, randomise_adapter):
    model = apply_rasa(tiny_model_factory(), RaSAConfig(r=2, k=1))
    save_adapter(model, tmp_path)
    randomise_adapter(model)
    save_adapter(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    tensors = load_file(tmp_path / WEIGHTS_FILE)
    assert torch.equal(tensors["rasa_pools.mlp.up_proj.B_shared"], model.rasa_pools["mlp"]["up_proj"].B_shared)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("r,k", [(4, 1), (4, 0), (4, 4)])
def test_peft_export_reproduces_logits_in_real_peft(family, r, k, tmp_path, tiny_model_factory, token_batch,
                                                    randomise_adapter):
    model = apply_rasa(tiny_model_factory(family), RaSAConfig(r=r, k=k))
    randomise_adapter(model, scale=0.1)
    with torch.no_grad():
        expected = model(token_batch).logits
    export_peft_lora(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    effective = r - k + 4 * k
    assert config["peft_type"] == "LORA" and config["r"] == effective and config["lora_alpha"] == effective
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.2.mlp.up_proj.lora_A.weight"].shape == (effective, 32)
    assert tensors["base_model.model.model.layers.2.mlp.up_proj.lora_B.weight"].shape == (48, effective)

    peft_model = PeftModel.from_pretrained(tiny_model_factory(family), tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(token_batch).logits
    assert (got - expected).abs().max().item() <= 1e-5


def test_k0_equals_real_peft_lora_with_copied_weights(tiny_model_factory, token_batch, randomise_adapter):
    """k = 0 is LoRA plus a trainable diagonal: with D folded into B it is PEFT LoRA exactly."""
    r = 4
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=r, k=0))
    randomise_adapter(model, scale=0.1)
    peft_model = get_peft_model(tiny_model_factory("llama"),
                                LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                             "gate_proj", "up_proj", "down_proj"]))
    peft_modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for name, layer in rasa_layers(model).items():
            assert layer.pool is None and layer.diag.shape == (r,)
            target = peft_modules[f"base_model.model.{name}"]
            target.lora_A["default"].weight.copy_(layer.A_private)
            target.lora_B["default"].weight.copy_(layer.B_private * layer.diag)
        peft_model.eval()
        diff = (peft_model(token_batch).logits - model(token_batch).logits).abs().max().item()
    assert diff <= 1e-5


def test_peft_export_uses_rank_pattern_when_depths_differ(tmp_path, tiny_model_factory, token_batch,
                                                          randomise_adapter):
    """A module type present in fewer layers has a smaller pool, hence another rank R."""
    def with_extra(model):
        model.model.layers[0].mlp.extra_proj = torch.nn.Linear(32, 32, bias=False)  # one layer only
        return model

    config = RaSAConfig(r=4, k=1, target_modules=("q_proj", "extra_proj"))
    model = apply_rasa(with_extra(tiny_model_factory("llama")), config)
    assert model.model.layers[0].mlp.extra_proj.effective_rank == 4
    assert model.model.layers[0].self_attn.q_proj.effective_rank == 7
    randomise_adapter(model, scale=0.1)
    with torch.no_grad():
        expected = model(token_batch).logits
    export_peft_lora(model, tmp_path)
    peft_config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert peft_config["r"] == 7 and peft_config["rank_pattern"] == {"extra_proj": 4}
    assert peft_config["alpha_pattern"] == {"extra_proj": 4}
    peft_model = PeftModel.from_pretrained(with_extra(tiny_model_factory("llama")), tmp_path).eval()
    extra = peft_model.base_model.model.model.layers[0].mlp.extra_proj
    assert extra.lora_A["default"].weight.shape == (4, 32) and extra.scaling["default"] == 1.0
    with torch.no_grad():
        assert (peft_model(token_batch).logits - expected).abs().max().item() <= 1e-5
