"""Streaming base weights to Megatron ranks: each rank reads only its slices of the HF safetensors
(``get_slice``), and what it reads is exactly what its state holds."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from rasa_megatron.convert.hf_checkpoint import SafetensorsCheckpoint
from rasa_megatron.convert.megatron_weights import hf_to_megatron


def _nbytes(state):
    return sum(t.numel() * t.element_size() for t in state.values())


def test_each_tensor_parallel_rank_reads_only_its_slices(tmp_path):
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path)
    full = {k: v.detach() for k, v in model.state_dict().items()}
    for tp_rank in range(2):
        checkpoint = SafetensorsCheckpoint(tmp_path)
        state = hf_to_megatron(checkpoint, config, tp_rank, 2)
        want = hf_to_megatron(full, config, tp_rank, 2)
        assert set(state) == set(want) and all(torch.equal(state[k], want[k]) for k in want)
        assert checkpoint.bytes_read == _nbytes(state)  # nothing read beyond the rank's own shards
        # half of every split matrix; the norms (replicated) are read whole
        norms = sum(t.numel() * t.element_size() for k, t in full.items() if "norm" in k)
        assert checkpoint.bytes_read == (_nbytes(full) - norms) // 2 + norms


def test_each_expert_parallel_rank_reads_only_its_experts(tmp_path):
    config = MixtralConfig(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(config)
    model.save_pretrained(tmp_path)  # transformers writes the per-expert on-disk layout
    full = {k: v.detach() for k, v in model.state_dict().items()}
    checkpoint = SafetensorsCheckpoint(tmp_path)
    state = hf_to_megatron(checkpoint, config, 0, 1, ep_rank=1, ep_size=2)
    want = hf_to_megatron(full, config, 0, 1, ep_rank=1, ep_size=2)
    assert all(torch.equal(state[k], want[k]) for k in want)
    experts = sum(t.numel() * t.element_size() for k, t in full.items() if ".experts." in k)
    assert checkpoint.bytes_read == _nbytes(full) - experts // 2  # the other rank's 2 of 4 experts unread
