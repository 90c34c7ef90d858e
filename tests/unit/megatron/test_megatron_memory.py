"""The Megatron engine's dry run: the layout's data-parallel size and the busiest rank's memory."""
from pathlib import Path

import pytest

from rasa_megatron.cli.train import dry_run_report
from rasa_megatron.training.dry_run import build_meta_model
from rasa_megatron.training.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[3] / "examples" / "configs"


def test_megatron_dry_run_reports_the_megatron_layout():
    """engine: megatron dry runs report the data-parallel size of the layout and the busiest rank's
    memory: frozen experts split over EP, dense weights over TP x PP, activations over TP under SP."""
    from rasa_megatron.megatron.memory import megatron_memory_row

    llama = load_recipe(CONFIGS / "llama3_70b_rasa_megatron.yaml")
    report = dry_run_report(llama)
    assert "micro 1 x 4 data-parallel x grad-accum 48" in report and "| Megatron TP8 x PP2 + SP |" in report
    assert "ZeRO" not in report
    mixtral = load_recipe(CONFIGS / "mixtral_8x7b_rasa_megatron.yaml")
    model = build_meta_model(mixtral)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n and not p.requires_grad)
    ep8 = megatron_memory_row(model, mixtral)
    mixtral.megatron.expert_model_parallel_size = 4
    ep4 = megatron_memory_row(model, mixtral)
    trainable_experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n and p.requires_grad)
    want = (2 * experts + 12 * trainable_experts) * (1 / 4 - 1 / 8) / 2**30  # one more expert per GPU
    assert abs((ep4["model_states_gib"] - ep8["model_states_gib"]) - want) < 1e-6
    assert ep4["activations_gib"] == ep8["activations_gib"]
    assert 13.0 < ep8["model_states_gib"] < 15.0  # 3.2 GB dense + 11.3 GB one expert (recipe header)
    llama.megatron.sequence_parallel = False
    no_sp = megatron_memory_row(build_meta_model(llama), llama)
    assert no_sp["activations_gib"] > 1.5 * megatron_memory_row(build_meta_model(llama), load_recipe(
        CONFIGS / "llama3_70b_rasa_megatron.yaml"))["activations_gib"]


def test_megatron_dry_run_counts_the_score_tensors_of_megatrons_own_attention():
    """megatron.attention: local (Megatron's unfused DotProductAttention) keeps 5 a s^2 b bytes of scores,
    softmax and dropout mask per layer over TP (the recomputed layer's only, with recompute); the SDPA
    default keeps none. At 70B, TP8, s = 4096, b = 1: 5 x 64 x 4096^2 / 8 bytes = 0.625 GiB more."""
    from rasa_megatron.megatron.memory import megatron_memory_row

    recipe = load_recipe(CONFIGS / "llama3_70b_rasa_megatron.yaml")
    model = build_meta_model(recipe)
    sdpa = megatron_memory_row(model, recipe)
    recipe.megatron.attention = "local"
    local = megatron_memory_row(model, recipe)
    assert abs((local["activations_gib"] - sdpa["activations_gib"]) - 5 * 64 * 4096**2 / 8 / 2**30) < 1e-9
    assert local["model_states_gib"] == sdpa["model_states_gib"]
    recipe.megatron.attention = "flash"
    from rasa_megatron.training.recipe import RecipeError, validate_recipe

    with pytest.raises(RecipeError, match=r"megatron.attention='flash'; valid: \['sdpa', 'local'\]"):
        validate_recipe(recipe, world_size=64, require_data=False)
