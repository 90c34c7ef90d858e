"""RaSA on transformers 5 Mixtral fused expert weights (gate_up_proj [E, 2I, H], down_proj [E, H, I]).

References are written out independently of rasa_megatron.functional: per expert, the dense
``W[e] + [B_i[e] | B_S[e]] diag(D_i[e]) [A_i[e]; A_S[e]]`` in fp64 (tolerance 1e-10), and real
PEFT ``target_parameters`` for the export (fp32, 1e-5).
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import MixtralConfig, MixtralForCausalLM

from rasa_megatron import (AdapterFormatError, RaSAConfig, adapter_state_dict, apply_rasa, export_peft_lora,
                           load_adapter, merge_adapter, merge_and_unload, rasa_layers, save_adapter,
                           unmerge_adapter)
from rasa_megatron.experts import RaSAExperts, RaSAExpertWeights

TINY_MIXTRAL = dict(vocab_size=96, hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def make_mixtral(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    return MixtralForCausalLM(MixtralConfig(**{**TINY_MIXTRAL, **overrides})).to(dtype).eval()


def rasa_mixtral(r=4, k=1, seed=0, dtype=torch.float32, target_modules=("q_proj", "v_proj"), targets=EXPERTS,
                 **overrides):
    model = make_mixtral(seed, dtype, **overrides)
    return apply_rasa(model, RaSAConfig(r=r, k=k, alpha=8, target_modules=target_modules, target_parameters=targets),
                      adapter_dtype=dtype)


def randomise(model, seed=3, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * scale)


def dense_expert_weight(unit: RaSAExpertWeights, base: torch.Tensor, expert: int) -> torch.Tensor:
    """``W[e] + [B_i | B_S] diag(D) [A_i ; A_S]`` for one expert, written out in fp64."""
    A = torch.cat([unit.A_private[expert], unit.pool.A_shared[expert]]).double()
    B = torch.cat([unit.B_private[expert], unit.pool.B_shared[expert]], dim=1).double()
    return base[expert].double() + B @ torch.diag(unit.diag[expert].double()) @ A


def test_experts_forward_equals_dense_per_expert_formula():
    model = rasa_mixtral(r=4, k=1, dtype=torch.float64)
    randomise(model)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, RaSAExperts)
    generator = torch.Generator().manual_seed(0)
    tokens, top_k, num_experts = 11, 2, TINY_MIXTRAL["num_local_experts"]
    hidden = torch.randn(tokens, 16, generator=generator, dtype=torch.float64)
    top_k_index = torch.stack([torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(tokens)])
    top_k_weights = torch.rand(tokens, top_k, generator=generator, dtype=torch.float64)
    got = experts(hidden, top_k_index, top_k_weights)
    want = torch.zeros_like(hidden)
    base = experts.base_layer
    for t in range(tokens):
        for slot in range(top_k):
            e = int(top_k_index[t, slot])
            gate, up = (dense_expert_weight(experts.gate_up_proj, base.gate_up_proj, e) @ hidden[t]).chunk(2)
            out = dense_expert_weight(experts.down_proj, base.down_proj, e) @ (F.silu(gate) * up)
            want[t] += top_k_weights[t, slot] * out
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_pool_per_expert_index_shared_across_layers_and_lora_parameter_budget():
    r, k, L, E, H, I = 4, 1, 3, 4, 16, 24
    model = rasa_mixtral(r=r, k=k, target_modules=())
    units = rasa_layers(model)
    assert sorted(units) == sorted(f"model.layers.{i}.{p}" for i in range(L) for p in EXPERTS)
    pool = model.rasa_pools["mlp"]["experts"]["gate_up_proj"]
    assert pool.A_shared.shape == (E, L * k, H) and pool.B_shared.shape == (E, 2 * I, L * k)
    assert all(units[f"model.layers.{i}.mlp.experts.gate_up_proj"].pool is pool for i in range(L))
    unit = units["model.layers.0.mlp.experts.down_proj"]
    assert unit.A_private.shape == (E, r - k, I) and unit.B_private.shape == (E, H, r - k)
    assert unit.diag.shape == (E, r - k + L * k) and unit.effective_rank == r - k + L * k
    # same A/B budget as LoRA of rank r on every expert of every layer (plus the diagonals)
    factors = sum(p.numel() for n, p in adapter_state_dict(model).items() if not n.endswith("diag"))
    assert factors == L * E * r * ((H + 2 * I) + (I + H))
    # router and base weights stay frozen; only adapter tensors train
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_state_dict(model)) and not any(".gate." in n for n in trainable)


def test_init_is_paper_eq6_per_expert_and_output_unchanged():
    base = make_mixtral()
    model = rasa_mixtral(r=8, k=2)
    tokens = torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # B = 0: the same function; the base model runs transformers' grouped_mm kernel, RaSA the eager
        # per-expert loop, so only the summation order differs (fp32, 1e-6)
        torch.testing.assert_close(model(tokens).logits, base(tokens).logits, rtol=0, atol=1e-6)
    unit = rasa_layers(model)["model.layers.2.mlp.experts.gate_up_proj"]
    assert torch.all(unit.diag[:, :6] == 8 / (2 * 6)) and torch.all(unit.diag[:, 6:] == 8 / (2 * 3 * 2))
    assert torch.all(unit.B_private == 0) and torch.all(unit.pool.B_shared == 0)
    bound = 1 / math.sqrt(16)  # kaiming_uniform(a=sqrt(5)) on [rank, in]: fan-in = in per expert
    assert unit.A_private.abs().max() <= bound and unit.A_private.abs().max() > 0.5 * bound
    assert not torch.equal(unit.A_private[0], unit.A_private[1])


def test_gradients_reach_every_hit_expert_and_the_shared_pool():
    model = rasa_mixtral(r=4, k=1)
    randomise(model)
    model.train()
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(2))
    model(tokens, labels=tokens).loss.backward()
    pool = model.rasa_pools["mlp"]["experts"]["down_proj"]
    assert pool.A_shared.grad is not None and pool.A_shared.grad.abs().sum() > 0
    unit = rasa_layers(model)["model.layers.0.mlp.experts.down_proj"]
    assert unit.diag.grad is not None and unit.diag.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.gate.weight.grad is None


def test_merge_unmerge_and_unload_keep_logits(tmp_path):
    model = rasa_mixtral()
    randomise(model)
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(tokens).logits
        merge_adapter(model)
        torch.testing.assert_close(model(tokens).logits, want, rtol=1e-5, atol=1e-5)
        unmerge_adapter(model)
        torch.testing.assert_close(model(tokens).logits, want, rtol=1e-5, atol=1e-5)
        merged = merge_and_unload(model)
        assert type(merged.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
        assert not hasattr(merged, "rasa_pools")
        torch.testing.assert_close(merged(tokens).logits, want, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_and_mismatch(tmp_path):
    model = rasa_mixtral()
    randomise(model)
    tokens = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(5))
    save_adapter(model, tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "rasa_config.json").read_text())
    assert meta["module_types"]["mlp.experts.gate_up_proj"] == {
        "in_features": 16, "out_features": 48, "layer_indices": [0, 1, 2], "num_experts": 4}
    assert meta["rasa_config"]["target_parameters"] == list(EXPERTS)
    loaded = load_adapter(make_mixtral(), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
    with pytest.raises(AdapterFormatError, match=r"mlp.experts.down_proj.*num_experts': 4.*num_experts': 8"):
        load_adapter(make_mixtral(num_local_experts=8), tmp_path / "a")


@pytest.mark.parametrize("target_modules,targets", [(("q_proj", "o_proj"), EXPERTS),
                                                     ((), ("experts.down_proj",)),
                                                     (("k_proj",), ("mlp.experts.gate_up_proj",))])
def test_peft_target_parameters_export_reproduces_logits(tmp_path, target_modules, targets):
    model = rasa_mixtral(r=4, k=1, target_modules=target_modules, targets=targets)
    randomise(model)
    tokens = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(tokens).logits
    export_peft_lora(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["r"] == config["lora_alpha"] == 4 - 1 + 3 * 1
    assert sorted(config["target_parameters"]) == sorted(f"mlp.{t.removeprefix('mlp.')}" for t in targets)
    assert config["lora_dropout"] == 0.0
    peft_model = PeftModel.from_pretrained(make_mixtral(), tmp_path / "peft").eval()
    with torch.no_grad():
        got = peft_model(tokens).logits
    assert (want - make_mixtral()(tokens).logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_dropout_applies_to_expert_adapter_input_in_training_only():
    model = make_mixtral()
    apply_rasa(model, RaSAConfig(r=4, k=1, dropout=0.5, target_modules=(), target_parameters=EXPERTS))
    randomise(model)
    tokens = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        evaluation = model(tokens).logits
        model.train()
        torch.manual_seed(0)
        training = model(tokens).logits
    assert not torch.allclose(training, evaluation)


def test_bad_expert_targets_name_what_exists():
    with pytest.raises(ValueError, match=r"unknown target parameter\(s\) \['experts.up_proj'\].*mlp.experts.down_proj"):
        apply_rasa(make_mixtral(), RaSAConfig(r=4, target_modules=(), target_parameters=("experts.up_proj",)))
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['down_proj'\].*target_parameters.*"
                                         r"mlp.experts.gate_up_proj"):
        apply_rasa(make_mixtral(), RaSAConfig(r=4, target_modules=("down_proj",)))
    with pytest.raises(ValueError, match=r"target_parameters must be a sequence.*'experts.down_proj'"):
        RaSAConfig(target_parameters="experts.down_proj")
    transposed = make_mixtral()
    transposed.model.layers[0].mlp.experts.is_transposed = True
    with pytest.raises(ValueError, match=r"layers.0.mlp.experts is a MixtralExperts with weights stored transposed"):
        apply_rasa(transposed, RaSAConfig(r=4, target_modules=(), target_parameters=EXPERTS))
