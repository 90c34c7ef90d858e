"""HF Llama <-> Megatron GPTModel base-weight conversion: bit-exact round trips on every layout and
clear errors for sizes a layout cannot split (the converted GPTModel against HF's logits:
tests/unit/megatron/test_megatron_model.py and, at TP=2, tests/distributed/test_megatron_parallel.py)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

from rasa_megatron.convert.megatron_weights import hf_to_megatron, megatron_to_hf, transformer_config_from_hf
from rasa_megatron.parallel_layout import check_parallel_sizes, stage_layers


def tiny(tied=False, **overrides):
    config = LlamaConfig(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied), **overrides})
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).state_dict()


@pytest.mark.parametrize("tp,pp,vpp", [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 2, 2), (2, 1, 2)])
@pytest.mark.parametrize("tied", [False, True])
def test_round_trip_is_exact(tp, pp, vpp, tied):
    config, state = tiny(tied)
    shards = {(t, p, v): hf_to_megatron(state, config, t, tp, p, pp, v, vpp)
              for t in range(tp) for p in range(pp) for v in range(vpp)}
    back = megatron_to_hf(shards, config)
    want = {k: v for k, v in state.items() if not (tied and k == "lm_head.weight")}
    assert set(back) == set(want)
    for key in want:
        assert torch.equal(back[key], want[key]), key
    chunk = shards[(0, 0, 0)]
    assert chunk["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 8 // tp, 32)
    assert chunk["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 48 // tp, 32)


def test_qkv_rows_follow_megatrons_group_layout():
    config, state = tiny()
    fused = hf_to_megatron(state, config, 0, 1)["decoder.layers.0.self_attention.linear_qkv.weight"]
    q, k = state["model.layers.0.self_attn.q_proj.weight"], state["model.layers.0.self_attn.k_proj.weight"]
    # group 1: query heads 2 and 3, then key head 1
    assert torch.equal(fused[32:48], q[16:32]) and torch.equal(fused[48:56], k[8:16])


def test_virtual_stages_interleave_layers():
    assert [list(stage_layers(8, p, 2, v, 2)) for v in range(2) for p in range(2)] == [[0, 1], [2, 3], [4, 5], [6, 7]]


@pytest.mark.parametrize("tp,pp,message", [(4, 1, "num_key_value_heads = 2 is not divisible by tensor-parallel size = 4"),
                                           (1, 3, "num_hidden_layers = 4 is not divisible by pipeline-parallel size = 3"),
                                           (2, 1, "vocab_size = 95 is not divisible by tensor-parallel size = 2")])
def test_sizes_a_layout_cannot_split_are_named(tp, pp, message):
    config, _ = tiny(vocab_size=95 if "vocab" in message else 96)
    with pytest.raises(ValueError, match=message):
        check_parallel_sizes(config, tp, pp)


def test_megatron_to_hf_needs_every_rank():
    config, state = tiny()
    with pytest.raises(ValueError, match=r"missing \(tp, pp, vp\) = \[\(1, 0, 0\)\]"):
        megatron_to_hf({(0, 0): hf_to_megatron(state, config, 0, 2)}, config)
    with pytest.raises(ValueError, match=r"pipeline ranks are missing"):
        megatron_to_hf({(0, 0): hf_to_megatron(state, config, 0, 1, 0, 2)}, config)


def test_megatron_targets_are_checked_against_the_hf_names():
    from rasa_megatron import RaSAConfig
    from rasa_megatron.megatron.inject import hf_module_types

    assert hf_module_types(RaSAConfig(target_modules=("v_proj", "q_proj"), target_parameters=("experts.down_proj",))) == (
        ["self_attn.q_proj", "self_attn.v_proj"], ["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['linear_qkv'\].*'q_proj'"):
        hf_module_types(RaSAConfig(target_modules=("linear_qkv",)))
    with pytest.raises(ValueError, match=r"unknown target parameter 'experts.w1'.*mlp.experts.gate_up_proj"):
        hf_module_types(RaSAConfig(target_modules=(), target_parameters=("experts.w1",)))


def tiny_mixtral(num_hidden_layers=2):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=num_hidden_layers,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    return config, MixtralForCausalLM(config).state_dict()


def test_mixtral_experts_split_by_expert_parallel_rank():
    config, state = tiny_mixtral()
    shard = hf_to_megatron(state, config, 0, 1, ep_rank=1, ep_size=2)
    assert torch.equal(shard["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"],
                       state["model.layers.1.mlp.experts.gate_up_proj"][2])
    assert torch.equal(shard["decoder.layers.0.mlp.router.weight"], state["model.layers.0.mlp.gate.weight"])
    with pytest.raises(ValueError, match="num_local_experts = 4 is not divisible by expert-parallel size = 3"):
        hf_to_megatron(state, config, 0, 1, ep_rank=0, ep_size=3)


@pytest.mark.parametrize("tp,pp,vpp,ep", [(1, 1, 1, 1), (1, 1, 1, 2), (2, 2, 1, 2), (1, 2, 2, 4)])
def test_mixtral_round_trip_is_exact(tp, pp, vpp, ep):
    config, state = tiny_mixtral(num_hidden_layers=4)
    shards = {(t, p, v, e): hf_to_megatron(state, config, t, tp, p, pp, v, vpp, e, ep)
              for t in range(tp) for p in range(pp) for v in range(vpp) for e in range(ep)}
    back = megatron_to_hf(shards, config)
    assert set(back) == set(state)
    for key in state:
        assert torch.equal(back[key], state[key]), key
    assert back["model.layers.3.mlp.experts.gate_up_proj"].shape == (4, 48, 16)
    if ep == 1:  # 2- and 3-tuple keys mean EP rank 0
        assert set(megatron_to_hf({k[:2]: s for k, s in shards.items()}, config)) == set(state)


def test_mixtral_megatron_to_hf_needs_every_expert_parallel_rank():
    config, state = tiny_mixtral()
    shards = {(0, 0, 0, e): hf_to_megatron(state, config, 0, 1, ep_rank=e, ep_size=4) for e in range(4)}
    with pytest.raises(ValueError, match=r"missing \(tp, pp, vp, ep\) = \[\(0, 0, 0, 2\)\]"):
        megatron_to_hf({k: s for k, s in shards.items() if k[3] != 2}, config)
    with pytest.raises(ValueError, match=r"holds 1 experts per layer; num_local_experts = 4 on expert-parallel "
                                         r"size = 2 needs 2: expert-parallel ranks are missing"):
        megatron_to_hf({k: s for k, s in shards.items() if k[3] < 2}, config)
    whole = hf_to_megatron(state, config, 0, 1)
    with pytest.raises(ValueError, match="num_local_experts = 4 is not divisible by expert-parallel size = 3"):
        megatron_to_hf({(0, 0, 0, e): whole for e in range(3)}, config)


# ---- transformer_config_from_hf: sizes and features it refuses ----------------------------------------

@pytest.mark.parametrize("overrides,tp,pp,message", [
    ({}, 3, 1, "num_attention_heads = 4 is not divisible by tensor-parallel size = 3"),
    ({}, 4, 1, "num_key_value_heads = 2 is not divisible by tensor-parallel size = 4"),
    ({"intermediate_size": 49}, 2, 1, "intermediate_size = 49 is not divisible by tensor-parallel size = 2"),
    ({"vocab_size": 95}, 2, 1, "vocab_size = 95 is not divisible by tensor-parallel size = 2"),
    ({}, 1, 3, "num_hidden_layers = 4 is not divisible by pipeline-parallel size = 3"),
    ({"hidden_act": "gelu"}, 1, 1, "hidden_act 'gelu' is not supported"),
    ({"attention_bias": True}, 1, 1, "has attention or MLP biases"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, 1, 1,
     "rope_type 'linear' .rope scaling. is not converted"),
])
def test_transformer_config_names_what_it_cannot_convert(overrides, tp, pp, message):
    config, _ = tiny(**overrides)
    with pytest.raises(ValueError, match=message):
        transformer_config_from_hf(config, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)


def test_transformer_config_follows_the_hf_config():
    config = MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                           sliding_window=5, attention_dropout=0.1)
    tc = transformer_config_from_hf(config, tensor_model_parallel_size=2)
    assert (tc.num_query_groups, tc.kv_channels, tc.ffn_hidden_size, tc.layernorm_epsilon) == (2, 16, 48, 1e-6)
    assert tc.normalization == "RMSNorm" and tc.gated_linear_unit and not tc.add_bias_linear
    assert tc.window_size == (4, 0) and tc.attention_dropout == 0.1 and tc.use_cpu_initialization
    assert not (tc.bias_activation_fusion or tc.masked_softmax_fusion or tc.apply_rope_fusion
                or tc.gradient_accumulation_fusion or tc.persist_layer_norm)
    with pytest.raises(ValueError, match="'qwen2' has attention or MLP biases"):
        transformer_config_from_hf(Qwen2Config(**dict(vocab_size=96, hidden_size=32, intermediate_size=48,
                                                      num_hidden_layers=2, num_attention_heads=4,
                                                      num_key_value_heads=2)))


def test_hf_to_megatron_refuses_ranks_outside_the_layout_and_biases():
    config, state = tiny()
    with pytest.raises(ValueError, match=r"tp_rank = 2 is outside \[0, 2\)"):
        hf_to_megatron(state, config, 2, 2)
    with pytest.raises(ValueError, match=r"pp_rank = 1 is outside \[0, 1\)"):
        hf_to_megatron(state, config, 0, 1, pp_rank=1)
    with pytest.raises(ValueError, match=r"biases \(model.layers.0.self_attn.q_proj.bias"):
        hf_to_megatron({**state, "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}, config, 0, 1)
