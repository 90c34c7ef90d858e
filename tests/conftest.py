"""Shared fixtures: tiny randomly initialised Hugging Face causal LMs of the supported families, and a
single-process Megatron world (CPU stand-ins of rasa_megatron.megatron.cpu_compat, RNG tracker seeded)."""
import socket

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


@pytest.fixture(scope="module")
def megatron_world():
    """A gloo world of size 1 with Megatron's model-parallel state (TP=PP=1), torn down afterwards."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    from megatron.core import tensor_parallel

    from rasa_megatron.megatron.cpu_compat import enable_cpu_megatron

    enable_cpu_megatron()  # CPU-only torch: Megatron's CUDA device and generator references -> CPU
    tensor_parallel.model_parallel_cuda_manual_seed(1234)  # the RNG tracker, as a GPU run seeds it
    yield parallel_state
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
