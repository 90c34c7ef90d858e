"""Bad input gets a clear error naming the bad value, and writes nothing."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rasa_megatron import (AdapterFormatError, RaSAConfig, apply_rasa, export_peft_lora, load_adapter,
                           merge_adapter, merge_and_unload, rasa_layers, save_adapter)
from rasa_megatron.adapter import CONFIG_FILE, WEIGHTS_FILE, _sha256


@pytest.mark.parametrize("kwargs,match", [
    (dict(r=8, k=9), r"0 <= k <= r=8, got k=9"),
    (dict(r=8, k=-1), r"0 <= k <= r=8, got k=-1"),
    (dict(r=0), r"positive integer, got r=0"),
    (dict(r=-4), r"positive integer, got r=-4"),
    (dict(r=2.5), r"got r=2.5"),
    (dict(alpha=0), r"alpha=0"),
    (dict(dropout=1.0), r"dropout=1.0"),
    (dict(target_modules="q_proj"), r"got the string 'q_proj'"),
    (dict(target_modules=()), r"non-empty"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RaSAConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown RaSAConfig keys \['rank'\]"):
        RaSAConfig.from_dict({"rank": 8})


def test_unknown_target_module_names_it_and_lists_valid_ones(tiny_model_factory):
    model = tiny_model_factory()
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['qkv_proj'\].*'q_proj'"):
        apply_rasa(model, RaSAConfig(r=4, target_modules=("q_proj", "qkv_proj")))
    assert not rasa_layers(model) and all(p.requires_grad for p in model.parameters())


def test_non_linear_target_is_refused(tiny_model_factory):
    with pytest.raises(ValueError, match=r"'mlp' at layers.0.mlp is a LlamaMLP, not nn.Linear"):
        apply_rasa(tiny_model_factory(), RaSAConfig(r=4, target_modules=("mlp",)))


def test_shape_differing_across_layers_is_refused(tiny_model_factory):
    model = tiny_model_factory()
    model.model.layers[2].mlp.up_proj = nn.Linear(32, 64, bias=False)
    with pytest.raises(ValueError, match=r"'mlp.up_proj' has different shapes across layers.*layer 2: in=32 out=64"):
        apply_rasa(model, RaSAConfig(r=4))
    assert not rasa_layers(model)


def test_applying_twice_is_refused(tiny_model_factory):
    model = apply_rasa(tiny_model_factory(), RaSAConfig(r=4))
    with pytest.raises(ValueError, match="already has RaSA adapters"):
        apply_rasa(model, RaSAConfig(r=4))


def test_model_without_decoder_layers_is_refused():
    with pytest.raises(ValueError, match=r"Sequential has no decoder-layer stack"):
        apply_rasa(nn.Sequential(nn.Linear(4, 4)), RaSAConfig(r=2))


@pytest.fixture
def saved_adapter(tmp_path, tiny_model_factory, randomise_adapter):
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=4, k=1))
    randomise_adapter(model)
    save_adapter(model, tmp_path / "adapter")
    return tmp_path / "adapter"


def assert_untouched(model):
    assert not rasa_layers(model) and not hasattr(model, "rasa_pools")


def test_load_into_different_shape_is_refused(saved_adapter, tiny_model_factory):
    model = tiny_model_factory("llama", intermediate_size=64)
    with pytest.raises(AdapterFormatError, match=r"'mlp.down_proj' is .*'in_features': 48.* in the adapter but .*'in_features': 64"):
        load_adapter(model, saved_adapter)
    assert_untouched(model)


def test_load_into_different_depth_is_refused(saved_adapter, tiny_model_factory):
    model = tiny_model_factory("llama", num_hidden_layers=3)
    with pytest.raises(AdapterFormatError, match=r"layer_indices"):
        load_adapter(model, saved_adapter)
    assert_untouched(model)


def test_load_into_different_architecture_is_refused(saved_adapter, tiny_model_factory):
    model = tiny_model_factory("qwen2")
    with pytest.raises(AdapterFormatError, match=r"trained on a 'llama' model; the given base model is 'qwen2'"):
        load_adapter(model, saved_adapter)
    assert_untouched(model)


def test_truncated_weights_are_refused(saved_adapter, tiny_model_factory):
    weights = saved_adapter / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    model = tiny_model_factory("llama")
    with pytest.raises(AdapterFormatError, match="truncated or corrupt"):
        load_adapter(model, saved_adapter)
    assert_untouched(model)


def test_corrupt_weights_with_matching_checksum_are_refused(saved_adapter, tiny_model_factory):
    weights = saved_adapter / WEIGHTS_FILE
    weights.write_bytes(b"\x00" * 64)
    meta = json.loads((saved_adapter / CONFIG_FILE).read_text())
    meta["weights_sha256"] = _sha256(weights)
    (saved_adapter / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="cannot read"):
        load_adapter(tiny_model_factory("llama"), saved_adapter)


def test_corrupt_config_is_refused(saved_adapter, tiny_model_factory):
    (saved_adapter / CONFIG_FILE).write_text('{"format": "rasa_megatron.adapter", "format_ver')
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        load_adapter(tiny_model_factory("llama"), saved_adapter)


def test_future_format_version_is_refused(saved_adapter, tiny_model_factory):
    meta = json.loads((saved_adapter / CONFIG_FILE).read_text())
    meta["format_version"] = 99
    (saved_adapter / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(AdapterFormatError, match="format_version=99; this rasa_megatron reads version 1"):
        load_adapter(tiny_model_factory("llama"), saved_adapter)


def test_missing_directory_is_refused(tmp_path, tiny_model_factory):
    with pytest.raises(AdapterFormatError, match="not a RaSA adapter directory"):
        load_adapter(tiny_model_factory("llama"), tmp_path / "nope")


def _rewrite_weights(adapter_dir, edit):
    weights = adapter_dir / WEIGHTS_FILE
    tensors = edit(load_file(weights))
    save_file(tensors, weights)
    meta = json.loads((adapter_dir / CONFIG_FILE).read_text())
    meta["weights_sha256"] = _sha256(weights)
    (adapter_dir / CONFIG_FILE).write_text(json.dumps(meta))


def test_missing_and_unknown_keys_are_refused(saved_adapter, tiny_model_factory):
    def edit(tensors):
        tensors["model.layers.0.mlp.up_proj.extra"] = torch.zeros(1)
        del tensors["rasa_pools.mlp.up_proj.A_shared"]
        return tensors

    _rewrite_weights(saved_adapter, edit)
    model = tiny_model_factory("llama")
    with pytest.raises(AdapterFormatError, match=r"unknown keys \['model.layers.0.mlp.up_proj.extra'\] and lacks "
                                                 r"keys \['rasa_pools.mlp.up_proj.A_shared'\]"):
        load_adapter(model, saved_adapter)
    assert_untouched(model)


def test_wrong_tensor_shape_is_refused(saved_adapter, tiny_model_factory):
    def edit(tensors):
        tensors["model.layers.1.self_attn.q_proj.diag"] = torch.zeros(9)
        return tensors

    _rewrite_weights(saved_adapter, edit)
    with pytest.raises(AdapterFormatError, match=r"model.layers.1.self_attn.q_proj.diag has shape \(9,\), the model needs \(7,\)"):
        load_adapter(tiny_model_factory("llama"), saved_adapter)


@pytest.mark.parametrize("write", [save_adapter, export_peft_lora])
def test_merged_model_cannot_be_saved_or_exported(write, tmp_path, tiny_model_factory):
    model = merge_adapter(apply_rasa(tiny_model_factory(), RaSAConfig(r=4)))
    with pytest.raises(ValueError, match="merged into the base weights.*unmerge_adapter"):
        write(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_and_unload(model)
    with pytest.raises(ValueError, match="has no RaSA adapters"):
        write(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_save_keeps_previous_adapter(saved_adapter, tiny_model_factory):
    before = {p.name: p.read_bytes() for p in saved_adapter.iterdir()}
    model = merge_adapter(apply_rasa(tiny_model_factory(), RaSAConfig(r=4)))
    with pytest.raises(ValueError):
        save_adapter(model, saved_adapter)
    assert {p.name: p.read_bytes() for p in saved_adapter.iterdir()} == before
