"""Shared fixtures: tiny randomly initialised Hugging Face causal LMs of the supported families."""
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}


def make_tiny_model(family: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random model of ``family`` (same weights for the same seed), in eval mode."""
    config_cls, model_cls = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY, **overrides})).to(dtype)
    return model.eval()


@pytest.fixture
def tiny_model_factory():
    return make_tiny_model


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(123)
    return torch.randint(0, TINY["vocab_size"], (2, 9), generator=generator)


def randomise_adapter_(model, seed: int = 7, scale: float = 0.2):
    """Give every adapter tensor random values so the update is non-trivial (B is zero at init)."""
    from rasa_megatron import adapter_state_dict

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(adapter_state_dict(model).items()):
            param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64).to(param.dtype) * scale)
    return model


@pytest.fixture
def randomise_adapter():
    return randomise_adapter_
