"""RaSA through Megatron's layer spec (``rasa_layer_spec``) in a single-process gloo world: the
built GPTModel holds HF ``apply_rasa``'s adapter after the same seed and gives the HF RaSA model's
logits (1e-5); its base linears are frozen; a second model from the same spec gets its own pools;
bad specs are refused. Multi-process layouts (TP2+SP, PP2xVPP2, dist-checkpoint resharding):
tests/distributed/test_megatron.py."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rasa_megatron import RaSAConfig, adapter_state_dict, apply_rasa
from rasa_megatron.megatron import (apply_rasa_megatron, freeze_base_parameters, gather_hf_adapter, load_hf_adapter_,
                                    megatron_rasa_units, rasa_layer_spec)
from rasa_megatron.convert.megatron_weights import hf_to_megatron, transformer_config_from_hf
from rasa_megatron.megatron.model import build_gpt_model, gpt_block_spec, gpt_layer_spec

RASA = RaSAConfig(r=4, k=1, alpha=8)


def hf_llama(layers=3):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).eval()


def spec_model(config, hf_state, seed=5, rasa=RASA):
    model = build_gpt_model(transformer_config_from_hf(config), config,
                            spec_transform=lambda block: rasa_layer_spec(block, rasa, seed=seed))
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf_state, config, 0, 1), strict=False)
    # a plain Megatron state dict loads: only adapter entries are missing
    assert not unexpected and all(".adapter" in m or "rasa_pools" in m or m.endswith("_extra_state")
                                  for m in missing), (missing, unexpected)
    return model.eval()


def test_spec_model_holds_apply_rasas_adapter_and_gives_hf_logits(megatron_world):
    config, hf = hf_llama()
    base_state = {k: v.clone() for k, v in hf.state_dict().items()}
    torch.manual_seed(1234)
    torch.rand(3)  # the global RNG state must not matter: the spec draws from its seed
    model = spec_model(config, base_state, seed=5)
    torch.manual_seed(5)
    apply_rasa(hf, RASA)
    want = {k: p.detach() for k, p in adapter_state_dict(hf).items()}
    got = gather_hf_adapter([model])
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # non-zero B so the adapters matter, then the same logits as the HF RaSA model
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter_state_dict(hf).values():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    load_hf_adapter_([model], {k: p.detach() for k, p in adapter_state_dict(hf).items()})
    ids = torch.randint(0, 96, (2, 10), generator=generator)
    with torch.no_grad():
        got_logits = model(ids, torch.arange(10).expand_as(ids), None)
        want_logits = hf(ids).logits
    assert (got_logits - want_logits).abs().max().item() <= 1e-5


def test_spec_model_freezes_its_layers_and_freeze_base_parameters_the_rest(megatron_world):
    config, hf = hf_llama()
    model = spec_model(config, hf.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # GPTModel builds these outside the layer spec
    assert {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"} <= trainable
    freeze_base_parameters(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapter" in n or "rasa_pools" in n for n in trainable)
    assert len(trainable) == 3 * 7 * 3 + 7 * 2  # layers x modules x (A_i, B_i, D_i) + pools x (A_S, B_S)
    assert sum(n.startswith("decoder.layers.0.rasa_pools.") for n in trainable) == 14  # on the first layer only
    with pytest.raises(ValueError, match="already has RaSA adapters"):
        apply_rasa_megatron(model, RASA)


def test_default_seed_is_the_last_manual_seed(megatron_world):
    config, hf = hf_llama(layers=2)
    torch.manual_seed(21)
    model = build_gpt_model(transformer_config_from_hf(config), config,
                            spec_transform=lambda block: rasa_layer_spec(block, RASA))
    torch.manual_seed(21)
    apply_rasa(hf, RASA)
    got = gather_hf_adapter([model])
    assert all(torch.equal(got[k], p.detach()) for k, p in adapter_state_dict(hf).items())


def test_two_models_from_one_spec_get_their_own_pools(megatron_world):
    config, hf = hf_llama()
    tconfig = transformer_config_from_hf(config)
    spec = rasa_layer_spec(gpt_block_spec(tconfig), RASA, seed=3)
    first, second = (build_gpt_model(tconfig, config, spec_transform=lambda _: spec) for _ in range(2))
    pools = [{id(u.pool) for u in megatron_rasa_units(m).values()} for m in (first, second)]
    assert len(pools[0]) == len(pools[1]) == 7 and not pools[0] & pools[1]
    a, b = gather_hf_adapter([first]), gather_hf_adapter([second])
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same adapter


def test_bad_specs_are_refused(megatron_world):
    config, _ = hf_llama()
    tconfig = transformer_config_from_hf(config)
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['w_in'\]"):
        rasa_layer_spec(gpt_layer_spec(), RaSAConfig(r=4, k=1, target_modules=("q_proj", "w_in")), seed=0)
    layer = gpt_layer_spec()
    with pytest.raises(TypeError, match="TransformerLayer"):
        rasa_layer_spec(layer.submodules.self_attention, RASA, seed=0)

    class OtherLinear(torch.nn.Linear):  # stands for a linear the wrappers cannot run (e.g. Transformer Engine's)
        def __init__(self, input_size, output_size, **_):
            super().__init__(input_size, output_size, bias=False)

    layer.submodules.self_attention.submodules.linear_proj = OtherLinear
    with pytest.raises(TypeError, match="spec.self_attention.linear_proj is .*OtherLinear.*; RaSA wraps Megatron-core's local"):
        rasa_layer_spec(layer, RASA, seed=0)
    # the post-build transform refuses it too, before changing anything
    from megatron.core.models.gpt import GPTModel

    model = GPTModel(tconfig, layer, vocab_size=96, max_sequence_length=64)
    trainable = [p.requires_grad for p in model.parameters()]
    with pytest.raises(TypeError, match="layer 0 self_attention.linear_proj is a .*OtherLinear; RaSA wraps"):
        apply_rasa_megatron(model, RASA)
    assert [p.requires_grad for p in model.parameters()] == trainable and not megatron_rasa_units(model)
    # o_proj not targeted: its linear is left alone
    build_gpt_model(tconfig, config, spec_transform=lambda _: rasa_layer_spec(
        layer, RaSAConfig(r=4, k=1, target_modules=("q_proj", "v_proj")), seed=0))
