"""HF Llama <-> Megatron GPTModel base-weight conversion: bit-exact round trips on every layout and
clear errors for sizes a layout cannot split (model-level logits are checked in
tests/distributed/test_megatron.py)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rasa_megatron.megatron.convert import check_parallel_sizes, hf_to_megatron, megatron_to_hf, stage_layers


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
    from rasa_megatron.megatron.inject import _hf_types

    assert _hf_types(RaSAConfig(target_modules=("v_proj", "q_proj"), target_parameters=("experts.down_proj",))) == (
        ["self_attn.q_proj", "self_attn.v_proj"], ["mlp.experts.down_proj"])
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['linear_qkv'\].*'q_proj'"):
        _hf_types(RaSAConfig(target_modules=("linear_qkv",)))
    with pytest.raises(ValueError, match=r"unknown target parameter 'experts.w1'.*mlp.experts.gate_up_proj"):
        _hf_types(RaSAConfig(target_modules=(), target_parameters=("experts.w1",)))


def test_mixtral_experts_split_by_expert_parallel_rank():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    state = MixtralForCausalLM(config).state_dict()
    shard = hf_to_megatron(state, config, 0, 1, ep_rank=1, ep_size=2)
    assert torch.equal(shard["decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight"],
                       state["model.layers.1.mlp.experts.gate_up_proj"][2])
    assert torch.equal(shard["decoder.layers.0.mlp.router.weight"], state["model.layers.0.mlp.gate.weight"])
    with pytest.raises(ValueError, match="num_local_experts = 4 is not divisible by expert-parallel size = 3"):
        hf_to_megatron(state, config, 0, 1, ep_rank=0, ep_size=3)
    with pytest.raises(ValueError, match="does not convert MoE"):
        megatron_to_hf({(0, 0): shard}, config)
