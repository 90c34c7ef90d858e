"""apply_rasa / merge / unmerge on tiny Llama, Mistral and Qwen2 models."""
import copy

import pytest
import torch
from torch import nn

from rasa_megatron import (RaSAConfig, RankPool, adapter_state_dict, apply_rasa,
                           merge_adapter, merge_and_unload, rasa_layers, unmerge_adapter)
from rasa_megatron.functional import rasa_delta
from rasa_megatron.inject import discover_module_types

FAMILIES = ["llama", "mistral", "qwen2"]
NUM_LAYERS = 4  # tests/conftest.py TINY


@pytest.mark.parametrize("family", FAMILIES)
def test_output_equals_base_at_init(family, tiny_model_factory, token_batch):
    model = tiny_model_factory(family)
    with torch.no_grad():
        base = model(token_batch).logits
    apply_rasa(model, RaSAConfig(r=4, k=1, alpha=8))
    with torch.no_grad():
        assert torch.equal(model(token_batch).logits, base)


@pytest.mark.parametrize("family", FAMILIES)
def test_only_adapter_parameters_train_and_budget_equals_lora(family, tiny_model_factory):
    model = tiny_model_factory(family)
    total_before = sum(p.numel() for p in model.parameters())
    config = RaSAConfig(r=4, k=1)
    apply_rasa(model, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(adapter_state_dict(model))
    assert all(("A_private" in n or "B_private" in n or n.endswith(".diag") or "rasa_pools" in n) for n in trainable)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == total_before
    layers = rasa_layers(model)
    assert len(layers) == 7 * NUM_LAYERS
    lora_budget = sum(config.r * (m.in_features + m.out_features) for m in layers.values())
    diag_params = sum(m.diag.numel() for m in layers.values())
    assert sum(p.numel() for p in trainable.values()) == lora_budget + diag_params


def test_one_pool_per_module_type_shared_by_all_layers(tiny_model_factory):
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=4, k=1))
    types = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    pools = {n: m for n, m in model.rasa_pools.named_modules() if isinstance(m, RankPool)}
    assert set(pools) == types
    for index, layer in enumerate(model.model.layers):
        assert layer.self_attn.q_proj.pool is pools["self_attn.q_proj"]
        assert layer.mlp.down_proj.pool is pools["mlp.down_proj"]
        assert layer.self_attn.q_proj.layer_index == index
    assert pools["mlp.down_proj"].A_shared.shape == (NUM_LAYERS * 1, 48)
    assert pools["self_attn.k_proj"].B_shared.shape == (16, NUM_LAYERS * 1)
    # the pool appears once in the state dict, not once per layer
    assert sum(k.endswith("A_shared") for k in model.state_dict()) == 7


def test_init_values_follow_the_paper(tiny_model_factory):
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=8, k=2, alpha=16))
    layer = model.model.layers[1].mlp.up_proj
    assert layer.private_rank == 6 and layer.pool_rank == 2 * NUM_LAYERS
    torch.testing.assert_close(layer.diag[:6], torch.full((6,), 16 / (2 * 6)))
    torch.testing.assert_close(layer.diag[6:], torch.full((8,), 16 / (2 * 8)))
    assert torch.count_nonzero(layer.B_private) == 0 and torch.count_nonzero(layer.pool.B_shared) == 0
    bound = 1 / 32 ** 0.5
    for A in (layer.A_private, layer.pool.A_shared):
        assert 0.5 * bound < A.abs().max() <= bound
    # different layers draw different private A's
    assert not torch.equal(layer.A_private, model.model.layers[2].mlp.up_proj.A_private)


@pytest.mark.parametrize("r,k", [(4, 1), (8, 4), (3, 0), (2, 2)])
def test_effective_rank_of_each_update(r, k, tiny_model_factory, randomise_adapter):
    model = apply_rasa(tiny_model_factory("llama", dtype=torch.float64), RaSAConfig(r=r, k=k), adapter_dtype=torch.float64)
    randomise_adapter(model)
    effective = r - k + NUM_LAYERS * k
    for name, layer in rasa_layers(model).items():
        rank = torch.linalg.matrix_rank(layer.delta_weight()).item()
        assert rank == min(effective, layer.in_features, layer.out_features), name


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_unmerge_and_merge_and_unload(family, tiny_model_factory, token_batch, randomise_adapter):
    model = apply_rasa(tiny_model_factory(family), RaSAConfig(r=4, k=1))
    randomise_adapter(model)
    weight_before = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    with torch.no_grad():
        adapted = model(token_batch).logits
        merge_adapter(model)
        assert all(layer.merged for layer in rasa_layers(model).values())
        torch.testing.assert_close(model(token_batch).logits, adapted, rtol=1e-5, atol=1e-5)
        unmerge_adapter(model)
        torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.base_layer.weight, weight_before,
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(model(token_batch).logits, adapted, rtol=1e-6, atol=1e-6)
        plain = merge_and_unload(model)
        assert plain is model and not rasa_layers(plain) and not hasattr(plain, "rasa_pools")
        assert type(plain.model.layers[0].mlp.down_proj) is nn.Linear
        assert not any("A_private" in n or "A_shared" in n for n in plain.state_dict())
        torch.testing.assert_close(plain(token_batch).logits, adapted, rtol=1e-5, atol=1e-5)


def test_merged_weight_is_base_plus_dense_delta(tiny_model_factory, randomise_adapter):
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=4, k=1))
    randomise_adapter(model)
    layer = model.model.layers[3].mlp.gate_proj
    expected = layer.base_layer.weight.double() + rasa_delta(
        layer.A_private.double(), layer.B_private.double(), layer.pool.A_shared.double(),
        layer.pool.B_shared.double(), layer.diag.double())
    merge_adapter(model)
    torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=1e-6, atol=1e-6)


def test_layer_forward_matches_dense_formula(tiny_model_factory, randomise_adapter):
    model = apply_rasa(tiny_model_factory("llama", dtype=torch.float64), RaSAConfig(r=6, k=2), adapter_dtype=torch.float64)
    randomise_adapter(model)
    layer = model.model.layers[2].self_attn.v_proj
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    expected = x @ (layer.base_layer.weight + layer.delta_weight()).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)


def test_pool_gradient_is_sum_over_layers(tiny_model_factory, randomise_adapter, token_batch):
    model = apply_rasa(tiny_model_factory("llama", dtype=torch.float64), RaSAConfig(r=4, k=1), adapter_dtype=torch.float64)
    randomise_adapter(model)
    pool = model.rasa_pools["mlp"]["down_proj"]
    model(token_batch).logits.square().mean().backward()
    total = pool.A_shared.grad.clone()
    # same loss, but each layer sees its own detached copy of the pool: the per-layer grads must add up
    pool.A_shared.grad = None
    copies = []
    for layer in model.model.layers:
        twin = RankPool(48, 32, NUM_LAYERS, NUM_LAYERS, dtype=torch.float64)
        twin.load_state_dict(pool.state_dict())
        object.__setattr__(layer.mlp.down_proj, "pool", twin)
        copies.append(twin)
    model(token_batch).logits.square().mean().backward()
    torch.testing.assert_close(sum(c.A_shared.grad for c in copies), total, rtol=1e-10, atol=1e-12)


def test_dropout_applies_to_adapter_input_only(tiny_model_factory, randomise_adapter, token_batch):
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=4, k=1, dropout=0.5))
    model.train()
    with torch.no_grad():
        base_only = model(token_batch).logits  # B = 0: adapter contributes nothing, dropout or not
        assert torch.equal(base_only, model(token_batch).logits)
        randomise_adapter(model)
        first, second = model(token_batch).logits, model(token_batch).logits
        assert not torch.equal(first, second)
        model.eval()
        assert torch.equal(model(token_batch).logits, model(token_batch).logits)


def test_training_steps_change_only_adapters(tiny_model_factory, token_batch):
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=4, k=1))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    model.train()
    for _ in range(5):
        loss = model(token_batch, labels=token_batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param, frozen[name]), name
    assert torch.count_nonzero(model.rasa_pools["self_attn"]["q_proj"].B_shared) > 0


def test_subset_of_targets_and_discovery(tiny_model_factory):
    model = tiny_model_factory("llama")
    types = discover_module_types(model, ("q_proj", "down_proj"))
    assert set(types) == {"self_attn.q_proj", "mlp.down_proj"}
    assert types["mlp.down_proj"].layer_indices == (0, 1, 2, 3)
    apply_rasa(model, RaSAConfig(r=2, k=1, target_modules=("q_proj", "down_proj")))
    assert len(rasa_layers(model)) == 2 * NUM_LAYERS
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)


def test_bf16_base_with_fp32_adapters(tiny_model_factory, token_batch, randomise_adapter):
    model = apply_rasa(tiny_model_factory("llama", dtype=torch.bfloat16), RaSAConfig(r=4, k=1))
    assert model.model.layers[0].self_attn.q_proj.diag.dtype == torch.float32
    randomise_adapter(model)
    logits = model(token_batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_deepcopy_keeps_pool_sharing(tiny_model_factory):
    model = apply_rasa(tiny_model_factory("llama"), RaSAConfig(r=4, k=1))
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].self_attn.q_proj.pool is twin.rasa_pools["self_attn"]["q_proj"]
    assert twin.model.layers[0].self_attn.q_proj.pool is not model.rasa_pools["self_attn"]["q_proj"]


def test_the_adapter_is_drawn_on_the_cpu_whatever_the_base_device(tiny_model_factory):
    """apply_rasa draws every adapter tensor from the CPU generator and then moves it to the base's
    device, so one seed gives one adapter on any device (a GPU under ZeRO-3, as the Megatron path;
    checked on a GPU by tools/gpu_check.sh): a bf16 base gets the fp32 base's adapter and leaves the
    generator where the fp32 one does; on a meta-device base (dry runs) nothing is drawn."""
    from transformers import LlamaForCausalLM

    config = RaSAConfig(r=4, k=1, alpha=8)
    fp32, bf16 = tiny_model_factory("llama", seed=0), tiny_model_factory("llama", seed=0, dtype=torch.bfloat16)
    with torch.device("meta"):
        meta = LlamaForCausalLM(fp32.config)
    states = []
    for model in (fp32, bf16, meta):
        torch.manual_seed(5)
        apply_rasa(model, config)
        states.append(torch.get_rng_state())
    want = adapter_state_dict(fp32)
    assert all(p.dtype == torch.float32 and torch.equal(p, want[k]) for k, p in adapter_state_dict(bf16).items())
    assert torch.equal(states[0], states[1])
    torch.manual_seed(5)
    assert torch.equal(states[2], torch.get_rng_state()) and not torch.equal(states[0], states[2])
    assert all(p.device.type == "meta" for p in adapter_state_dict(meta).values())
