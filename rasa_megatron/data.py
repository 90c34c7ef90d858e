"""Training data for examples/pretrain_rasa.py: local files -> tokenised ``datasets`` -> a batch plan.

Two modes:

* ``pretrain``: every document's tokens followed by EOS, concatenated and cut into blocks of
  ``seq_len`` (the remainder is dropped); labels = inputs.
* ``sft``: the Alpaca template (the paper's Appendix B prompt without the math suffix) around
  ``instruction`` [+ ``input``]; labels are ``-100`` on the prompt so the loss is on the response.

The batch plan is a pure function of ``(seed, epoch, lengths, global batch)``: the same on every
rank and for every world size, so a resumed or resharded run sees exactly the same global batches.
Micro-batch ``j`` of a global step is the ``j``-th slice of ``micro_batch_size`` samples; rank
``r`` of ``W`` takes micro-batches ``r, r + W, ...``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
IGNORE_INDEX = -100

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".txt": "text"}


def load_raw_dataset(paths: list[str]):
    """Load local files of one format with ``datasets`` (no hub access)."""
    import datasets

    files = []
    for path in map(Path, paths):
        files.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    kinds = {_FORMATS.get(p.suffix) for p in files}
    if None in kinds or len(kinds) != 1:
        bad = sorted({p.suffix for p in files if p.suffix not in _FORMATS}) or sorted(kinds)
        raise ValueError(f"data files must share one format among {sorted(_FORMATS)}; got {bad} in {paths}")
    builder, = kinds
    return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")


def sft_prompt(example: dict, instruction_field: str = "instruction", input_field: str = "input") -> str:
    extra = example.get(input_field) or ""
    if extra:
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=example[instruction_field], input=extra)
    return ALPACA_PROMPT.format(instruction=example[instruction_field])


def tokenize_dataset(raw, tokenizer, data_cfg):
    """Tokenise per ``data_cfg`` (a :class:`recipe.DataSection`); returns a dataset with
    ``input_ids`` and ``labels`` columns (lists of ints)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; training data needs an end-of-sequence token")
    seq_len = data_cfg.seq_len
    if data_cfg.mode == "pretrain":
        if data_cfg.text_field not in raw.column_names:
            raise ValueError(f"data.text_field={data_cfg.text_field!r} not in the data columns {raw.column_names}")

        def pack(batch):
            ids = []
            for text in batch[data_cfg.text_field]:
                ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])
            blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
            return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

        return raw.map(pack, batched=True, batch_size=1000, remove_columns=raw.column_names,
                       num_proc=data_cfg.num_proc, desc="pack")
    for column in (data_cfg.instruction_field, data_cfg.response_field):
        if column not in raw.column_names:
            raise ValueError(f"sft data needs column {column!r}; the data has {raw.column_names}")

    def encode(example):
        prompt = tokenizer(sft_prompt(example, data_cfg.instruction_field, data_cfg.input_field),
                           add_special_tokens=False)["input_ids"]
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            prompt = [tokenizer.bos_token_id] + prompt
        response = tokenizer(example[data_cfg.response_field], add_special_tokens=False)["input_ids"] + [eos]
        input_ids = (prompt + response)[:seq_len]
        labels = ([IGNORE_INDEX] * len(prompt) + response)[:seq_len]
        return {"input_ids": input_ids, "labels": labels}

    encoded = raw.map(encode, remove_columns=raw.column_names, num_proc=data_cfg.num_proc, desc="tokenise")
    return encoded.filter(lambda ex: any(label != IGNORE_INDEX for label in ex["labels"]), desc="drop empty")


def global_batch_plan(lengths: np.ndarray, global_batch_size: int, seed: int, epoch: int,
                      group_by_length: bool = True, megabatch_factor: int = 16) -> np.ndarray:
    """Sample indices of one epoch as ``[num_steps, global_batch_size]`` (the tail is dropped).

    With ``group_by_length`` (as the paper trained) the shuffled epoch is cut into mega-batches of
    ``megabatch_factor`` global batches, each sorted by length (longest first), so micro-batches
    hold similar lengths and padding is small; the global batches are then shuffled again.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    num_steps = len(order) // global_batch_size
    if num_steps == 0:
        raise ValueError(f"the dataset has {len(order)} samples, fewer than one global batch of {global_batch_size}")
    order = order[:num_steps * global_batch_size]
    if group_by_length:
        mega = global_batch_size * megabatch_factor
        chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
        order = np.concatenate([c[np.argsort(-lengths[c], kind="stable")] for c in chunks])
    batches = order.reshape(num_steps, global_batch_size)
    if group_by_length:
        batches = batches[rng.permutation(num_steps)]
    return batches


def micro_batches_for_rank(global_batch: np.ndarray, micro_batch_size: int, rank: int, world_size: int) -> list:
    """This rank's micro-batches (index arrays) of one global batch, in order."""
    micro = global_batch.reshape(-1, micro_batch_size)
    return [micro[j] for j in range(rank, len(micro), world_size)]


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample; padding has label ``-100`` and attention 0."""
    width = max(len(f["input_ids"]) for f in features)
    input_ids = torch.full((len(features), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, feature in enumerate(features):
        n = len(feature["input_ids"])
        input_ids[row, :n] = torch.as_tensor(feature["input_ids"])
        labels[row, :n] = torch.as_tensor(feature["labels"])
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
