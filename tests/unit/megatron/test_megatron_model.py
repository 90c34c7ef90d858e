"""The Megatron GPTModel the engine builds (rasa_megatron.megatron.model): its SDPA core attention
against plain softmax attention (fp64, 1e-12), and a single-process GPTModel (gloo world of 1) with
converted HF weights giving HF Llama's and Mistral's (sliding window) logits (fp32, 1e-5)."""
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from rasa_megatron.convert.megatron_weights import hf_to_megatron, transformer_config_from_hf
from rasa_megatron.megatron.sdpa_attention import SDPADotProductAttention
from rasa_megatron.megatron.model import build_gpt_model


def tiny(tied=False, **overrides):
    config = LlamaConfig(**{**dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   tie_word_embeddings=tied), **overrides})
    torch.manual_seed(0)
    return config, LlamaForCausalLM(config).state_dict()


# ---- the SDPA core attention on its own ------------------------------------------------------------------

class _Group:
    def __init__(self, size):
        self._size = size

    def size(self):
        return self._size


def _attention(tp=1, heads=4, groups=2, head_dim=8, **config_fields):
    from megatron.core.transformer.enums import AttnMaskType

    config, _ = tiny(num_attention_heads=heads, num_key_value_heads=groups, head_dim=head_dim)
    tc = transformer_config_from_hf(config, tensor_model_parallel_size=tp, **config_fields)
    return SDPADotProductAttention(tc, 1, AttnMaskType.causal, "self",
                                    pg_collection=SimpleNamespace(tp=_Group(tp))).eval()


def _reference_attention(q, k, v, allowed):
    """Plain softmax attention, ``q [sq, b, np, d]``, ``k/v [sk, b, ng, d]``, ``allowed [sq, sk]``."""
    repeat = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(repeat, dim=2), v.repeat_interleave(repeat, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / q.shape[-1] ** 0.5
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,kbhd->qbhd", probs, v).reshape(q.shape[0], q.shape[1], -1)


def test_sdpa_attention_matches_plain_softmax_attention(megatron_world):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(7, 2, n, 8, generator=gen, dtype=torch.float64) for n in (4, 2, 2))
    causal = torch.ones(7, 7, dtype=torch.bool).tril()
    attention = _attention()
    want = _reference_attention(q, k, v, causal)
    assert torch.allclose(attention(q, k, v, None), want, atol=1e-12)
    assert torch.allclose(attention(q, k, v, ~causal[None, None]), want, atol=1e-12)  # Megatron's mask: True = masked
    # decoding one token against a cache attends to every key
    assert torch.allclose(attention(q[-1:], k, v, None), want[-1:], atol=1e-12)
    # a sliding window of 3 keys: each query sees itself and the 2 keys before it
    behind = torch.arange(7)[:, None] - torch.arange(7)[None, :]  # query index - key index
    windowed = _attention(window_size=(2, 0))
    assert torch.allclose(windowed(q, k, v, None), _reference_attention(q, k, v, (behind >= 0) & (behind <= 2)),
                          atol=1e-12)


def test_sdpa_attention_takes_this_tensor_parallel_ranks_heads(megatron_world):
    attention = _attention(tp=2)
    assert (attention.num_attention_heads_per_partition, attention.num_query_groups_per_partition) == (2, 1)
    q, k = torch.randn(5, 1, 2, 8), torch.randn(5, 1, 1, 8)
    assert attention(q, k, k, None).shape == (5, 1, 16)
    with pytest.raises(ValueError, match="query has 4 heads and key 2 groups; this TP rank expects 2 and 1"):
        attention(torch.randn(5, 1, 4, 8), torch.randn(5, 1, 2, 8), torch.randn(5, 1, 2, 8), None)


# ---- a single-process GPTModel against HF -------------------------------------------------------------

def _megatron_logits(hf_model, hf_config, input_ids):
    torch.manual_seed(0)
    model = build_gpt_model(transformer_config_from_hf(hf_config), hf_config).eval()
    missing, unexpected = model.load_state_dict(hf_to_megatron(hf_model.state_dict(), hf_config, 0, 1), strict=False)
    assert not [m for m in missing if not m.endswith("_extra_state")] and not unexpected, (missing, unexpected)
    positions = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    with torch.no_grad():
        return model(input_ids, positions, None)  # [b, s, vocab] without labels


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gpt_model_gives_hf_llama_logits(megatron_world, tied):
    config, _ = tiny(tied, num_hidden_layers=2, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
    got = _megatron_logits(hf, config, ids)
    assert got.shape == want.shape == (2, 11, 96)
    assert (got - want).abs().max().item() <= 1e-5


def test_gpt_model_gives_hf_mistral_sliding_window_logits(megatron_world):
    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8)
    config = MistralConfig(**fields, sliding_window=4)
    torch.manual_seed(0)
    hf = MistralForCausalLM(config).eval()
    ids = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        unwindowed = MistralForCausalLM(MistralConfig(**fields, sliding_window=None)).eval()
        unwindowed.load_state_dict(hf.state_dict())
        assert (unwindowed(ids).logits - want).abs().max() > 1e-3  # the window matters at 11 tokens
    assert (_megatron_logits(hf, config, ids) - want).abs().max().item() <= 1e-5
