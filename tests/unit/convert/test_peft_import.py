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
                            ({"use_dora": True}, "use_dora is set")):
        config_file.write_text(json.dumps({**config, **change}))
        with pytest.raises(ValueError, match=message):
            rasa_from_peft_lora(tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match="is not a PEFT LoRA adapter"):
        rasa_from_peft_lora(tmp_path)


def test_hf_to_megatron_round_trips_a_mixtral_expert_adapter(tmp_path):
    """HF Mixtral + RaSA on attention and on every expert (``target_parameters``: per-expert private
    factors and diagonals, one pool per expert index) -> ``hf-to-megatron --ep 2`` (one process) -> read
    back offline: every adapter tensor bit for bit and the same RaSA config (the base alone with --dtype
    bf16: every tensor the bf16 cast of the HF one); ``megatron-to-hf --merged``
    from the checkpoint's own base weights (Mixtral's per-expert on-disk names) equals, bit for bit, the
    merge onto the HF base, and its logits equal the RaSA model's (fp32, 1e-5). The PEFT export of the
    same adapter imports back to RaSA on the experts with the same logits and goes through
    hf-to-megatron the same way."""
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    from rasa_megatron import save_adapter
    from rasa_megatron.cli.convert import main
    from rasa_megatron.convert.dist_checkpoint import adapter_from_dist_checkpoint

    config = MixtralConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           tie_word_embeddings=False)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "base")
    rasa = RaSAConfig(r=4, k=1, alpha=8, target_modules=("q_proj", "o_proj"),
                      target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))
    apply_rasa(model, rasa)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    save_adapter(model, tmp_path / "adapter")
    assert main(["hf-to-megatron", str(tmp_path / "base"), str(tmp_path / "dist"), "--ep", "2", "--adapter",
                 str(tmp_path / "adapter")]) == 0
    tensors, read_config, _ = adapter_from_dist_checkpoint(tmp_path / "dist")
    given = load_file(tmp_path / "adapter" / "rasa_adapter.safetensors")
    assert sorted(tensors) == sorted(given), sorted(set(tensors) ^ set(given))[:4]
    assert all(torch.equal(tensors[key], given[key]) for key in given)
    assert (read_config.r, read_config.k, set(read_config.target_parameters)) == (4, 1, set(rasa.target_parameters))
    assert set(read_config.target_modules) == {"q_proj", "o_proj"}
    for source, out in ((str(tmp_path / "dist"), "m_dist"), ("--base", "m_hf")):
        extra = ["--base", str(tmp_path / "base")] if source == "--base" else []
        assert main(["megatron-to-hf", str(tmp_path / "dist"), "--hf-config", str(tmp_path / "base"), "--merged",
                     str(tmp_path / out), *extra]) == 0
    from_dist, from_hf = (load_file(tmp_path / name / "model.safetensors") for name in ("m_dist", "m_hf"))
    assert sorted(from_dist) == sorted(from_hf) and all(torch.equal(from_dist[k], from_hf[k]) for k in from_hf)
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in from_dist
    # the base alone in bf16 (--dtype; the default takes the config's, fp32 here): each tensor the bf16
    # cast of the HF one, read back through the same per-layer reader
    from transformers import AutoConfig

    from rasa_megatron.convert.dist_checkpoint import DistBaseWeights
    from rasa_megatron.convert.merged import BaseWeights

    assert main(["hf-to-megatron", str(tmp_path / "base"), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    bf16, source = DistBaseWeights(tmp_path / "bf16", AutoConfig.from_pretrained(tmp_path / "base")), BaseWeights(
        tmp_path / "base")
    assert sorted(bf16.keys()) == sorted(source.keys())
    assert all(torch.equal(bf16.read(key), source.read(key).bfloat16()) for key in source.keys())
    assert json.loads((tmp_path / "bf16" / "checkpoint.json").read_text())["base_dtype"] == "bfloat16"
    merged = MixtralForCausalLM.from_pretrained(tmp_path / "m_dist").eval()
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, model(tokens).logits, rtol=0, atol=1e-5)
    # the PEFT export (experts under target_parameters) comes back with r, k and the expert targets, every
    # A factor exact, the same logits; hf-to-megatron of it holds exactly the imported tensors
    export_peft_lora(model, tmp_path / "peft")
    imported, imported_config = rasa_from_peft_lora(tmp_path / "peft")
    assert (imported_config.r, imported_config.k) == (4, 1)
    assert set(imported_config.target_parameters) == set(rasa.target_parameters)
    assert set(imported_config.target_modules) == {"q_proj", "o_proj"}
    assert sorted(imported) == sorted(given)
    assert all(torch.equal(imported[key], given[key]) for key in given if key.endswith(("A_private", "A_shared")))
    torch.manual_seed(0)
    again = apply_rasa(MixtralForCausalLM(config).eval(), imported_config)
    assign_adapter_tensors_(again, imported)
    with torch.no_grad():
        torch.testing.assert_close(again(tokens).logits, model(tokens).logits, rtol=0, atol=1e-5)
    assert main(["hf-to-megatron", str(tmp_path / "base"), str(tmp_path / "dist_peft"), "--ep", "2", "--adapter",
                 str(tmp_path / "peft")]) == 0
    placed, _, _ = adapter_from_dist_checkpoint(tmp_path / "dist_peft")
    assert sorted(placed) == sorted(imported) and all(torch.equal(placed[k], imported[k]) for k in imported)


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
