"""Training data for both engines: local files -> tokenised ``datasets`` -> a batch plan.

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

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .recipe import Recipe

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


def load_tokenizer(recipe: Recipe):
    """The recipe's tokenizer (``model.tokenizer``, else ``model.path``; the GGUF file when given), with
    the EOS token as padding when it has none."""
    from transformers import AutoTokenizer

    m = recipe.model
    source = m.tokenizer or m.path
    kwargs = {"gguf_file": m.gguf_file} if m.gguf_file and source == m.path else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class TrainingData:
    """A tokenised training set and its deterministic plan of global batches.

    Attributes:
        dataset: rows with ``input_ids`` and ``labels``.
        lengths: ``[num_samples]`` token count of every row.
        steps_per_epoch: full global batches per epoch; ``total_steps``: of the whole run.
    """
    dataset: object
    lengths: np.ndarray
    global_batch_size: int
    seed: int
    group_by_length: bool
    steps_per_epoch: int
    total_steps: int
    sha256: str = ""
    _plan: tuple = field(default=(None, None), repr=False)

    def global_batch(self, step: int) -> np.ndarray:
        """Sample indices ``[global_batch_size]`` of global step ``step`` (0-based)."""
        epoch = step // self.steps_per_epoch
        if self._plan[0] != epoch:
            self._plan = (epoch, global_batch_plan(self.lengths, self.global_batch_size, self.seed, epoch,
                                                   self.group_by_length))
        return self._plan[1][step % self.steps_per_epoch]

    def samples(self, indices) -> list[dict]:
        return [self.dataset[int(i)] for i in indices]

    def tokens(self, indices) -> int:
        """Non-padding input tokens of the samples ``indices``."""
        return int(self.lengths[np.asarray(indices)].sum())


def prepare_training_data(recipe: Recipe, tokenizer, rank: int = 0, barrier: Callable[[], None] | None = None
                          ) -> TrainingData:
    """Tokenise the recipe's data (rank 0 first, filling the ``datasets`` cache the others then read,
    when ``barrier`` is given) and plan the run; a data set smaller than one global batch is refused
    with SystemExit naming both numbers."""
    if rank != 0 and barrier is not None:
        barrier()
    dataset = tokenize_dataset(load_raw_dataset(recipe.data.paths), tokenizer, recipe.data)
    if rank == 0 and barrier is not None:
        barrier()
    t = recipe.train
    steps_per_epoch = len(dataset) // t.global_batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {len(dataset)} training samples is fewer than one global batch "
                         f"({t.global_batch_size})")
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)
    return TrainingData(dataset, lengths, t.global_batch_size, t.seed, recipe.data.group_by_length, steps_per_epoch,
                        total_steps, tokenised_sha256(dataset, lengths))


def tokenised_sha256(dataset, lengths: np.ndarray) -> str:
    """sha256 of every sample's length, tokens and labels, in order (what a resume must see again)."""
    import pyarrow.compute as pc

    sha = hashlib.sha256(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    for table in dataset.with_format("arrow").iter(batch_size=65536):
        for column in ("input_ids", "labels"):
            values = pc.list_flatten(table.column(column)).to_numpy()
            sha.update(np.ascontiguousarray(values, dtype=np.int64).tobytes())
    return sha.hexdigest()
