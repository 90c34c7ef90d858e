"""The Megatron engine's micro-batches: padded to their own longest sample, rounded up to what
sequence parallelism needs (the TP size), with HF labels shifted to Megatron's next-token convention."""
import torch

from rasa_megatron.megatron.engine import _pad_micro_batch, padded_length


def test_micro_batches_pad_to_their_longest_sample_rounded_for_sequence_parallelism():
    features = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5]}]
    assert padded_length(features, 1) == 5 and padded_length(features, 2) == 6 and padded_length(features, 8) == 8
    batch = _pad_micro_batch(features, padded_length(features, 2), pad_id=0)
    assert batch["input_ids"].shape == (2, 6)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 0, 0, 0]
    # position t is scored against the next token: labels[t] = hf_labels[t + 1], masked where there is none
    assert batch["labels"][0].tolist()[:2] == [6, 7] and batch["loss_mask"][0].tolist() == [1, 1, 0, 0, 0, 0]
    assert batch["labels"][1].tolist()[:4] == [2, 3, 4, 5] and batch["loss_mask"][1].tolist() == [1, 1, 1, 1, 0, 0]
    assert torch.equal(batch["position_ids"][1], torch.arange(6))
