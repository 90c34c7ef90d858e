"""The eval suite runs with the network blocked (every test: a socket connect other than a Unix
socket raises), plus a real tokenizer (SmolLM2's, from the shipped GGUF) and tiny Llama models whose
vocabulary matches it."""
import socket

import pytest
import torch


class NetworkBlocked(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Refuse every non-Unix socket connection for the duration of each test."""
    original_connect = socket.socket.connect

    def guarded_connect(sock, address, *args, **kwargs):
        if sock.family == socket.AF_UNIX:
            return original_connect(sock, address, *args, **kwargs)
        raise NetworkBlocked(f"the eval suite must run offline; tried to connect to {address!r}")

    def guarded_create_connection(address, *args, **kwargs):
        raise NetworkBlocked(f"the eval suite must run offline; tried to connect to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket.socket, "connect_ex", guarded_connect)
    monkeypatch.setattr(socket, "create_connection", guarded_create_connection)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from rasa_megatron.models import smollm2_gguf_path

    path = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@pytest.fixture(scope="session")
def tiny_llama():
    """Factory: ``tiny_llama(tokenizer, seed=0, layers=2)``."""
    return make_tiny_llama


def make_tiny_llama(tokenizer, seed: int = 0, layers: int = 2):
    """A random Llama (hidden 32) over ``tokenizer``'s vocabulary, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()
