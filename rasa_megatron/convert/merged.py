"""A merged Hugging Face model (``W + ΔW``) written tensor by tensor from the base checkpoint on disk.

The base is never loaded whole: each base tensor is read alone (``safe_open``, the file unmapped after
each read), the RaSA update of that tensor is added in fp32 and the sum cast back to the base dtype (the
arithmetic of :meth:`MergeableUpdate.merge`, so the result equals ``merge_and_unload`` bit for bit), and
output shards of at most ``max_shard_size`` bytes are written one at a time. Peak memory is one output
shard + one tensor's fp32 working set (base, ΔW, sum) + the adapter, independent of depth.

Tensor names are kept as the base stores them on disk (Mixtral's per-expert ``block_sparse_moe.experts.
{e}.w1/w2/w3`` included), so ``from_pretrained`` of the output applies the same load-time conversions as
for the base. Every base tensor is written exactly once and every adapter update applied exactly once:
an update without its base tensor, or of another shape, is an error naming the key.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..inject import rasa_layers

INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}
_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
          "F8_E4M3": 1, "F8_E5M2": 1}


def tensor_nbytes(shape, dtype: str) -> int:
    """Bytes of a tensor of ``shape`` and safetensors dtype name ``dtype`` ("BF16", "F32", ...)."""
    count = 1
    for dim in shape:
        count *= dim
    return count * _BYTES.get(dtype, 4)


def parse_size(text: str | int) -> int:
    """Bytes of ``"5GB"``, ``"500MB"``, ``"2GiB"``, ``"1000"`` (GB = 10^9 as in transformers, GiB = 2^30)."""
    if isinstance(text, int):
        size = text
    else:
        match = _SIZE.match(str(text))
        if not match:
            raise ValueError(f"size {text!r} is not a number of bytes with an optional unit (e.g. 5GB, 500MB, 2GiB)")
        unit = (match.group(2) or "").upper().removesuffix("B")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def human_size(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


class BaseWeights:
    """The tensors of a HF checkpoint directory as stored on disk (sharded or not): names, shapes and
    dtypes from the safetensors headers; :meth:`read` loads one tensor and unmaps its file again."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        index = self.path / INDEX_FILE
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors weights in {self.path}: the base model's weights are needed "
                                    "for a merged model (pass the base model directory)")
        self.file_of: dict[str, str] = {}
        self.shape: dict[str, tuple[int, ...]] = {}
        self.dtype: dict[str, str] = {}
        for name in files:
            try:
                with safe_open(self.path / name, "pt") as handle:
                    for key in handle.keys():
                        view = handle.get_slice(key)
                        self.file_of[key], self.shape[key], self.dtype[key] = name, tuple(view.get_shape()), view.get_dtype()
            except (SafetensorError, OSError) as err:
                raise ValueError(f"{self.path / name} is not a readable safetensors file ({err}); is it truncated?") from err

    def keys(self) -> list[str]:
        """On-disk names, file by file in file order (the base's layer order)."""
        return sorted(self.file_of, key=lambda k: (self.file_of[k], _natural(k)))

    def nbytes(self, key: str) -> int:
        return tensor_nbytes(self.shape[key], self.dtype[key])

    def read(self, key: str) -> torch.Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(self.path / self.file_of[key], "pt") as handle:
                return handle.get_tensor(key)
        except SafetensorError as err:
            raise ValueError(f"cannot read {key} from {self.path / self.file_of[key]} ({err}); is it truncated?") from err


def _natural(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


@dataclass(frozen=True)
class Update:
    """Where a base tensor's update comes from: adapter unit ``unit`` (its ``[out, in]`` ΔW, or expert
    ``expert``'s of a stacked unit), rows ``rows`` of it (a Mixtral ``w1``/``w3`` half) or all."""

    unit: str
    expert: int | None = None
    rows: tuple[int, int] | None = None


def _mixtral_expert_keys(experts_path: str) -> str | None:
    """``model.layers.3.mlp.experts`` -> ``model.layers.3.block_sparse_moe.experts`` (Mixtral's on-disk names)."""
    prefix, sep, rest = experts_path.rpartition(".mlp.")
    return f"{prefix}.block_sparse_moe.{rest}" if sep else None


def update_map(model, base: BaseWeights) -> dict[str, Update]:
    """``{on-disk base key: Update}`` for every adapter unit of ``model`` (a RaSA model, e.g. on meta).
    Raises ValueError naming a unit whose base tensor is missing or has another shape."""
    updates: dict[str, Update] = {}
    problems = []
    for name, unit in rasa_layers(model).items():
        experts = getattr(unit, "num_experts", 0)
        if not experts:
            key = f"{name}.weight"
            want = (unit.out_features, unit.in_features)
            if key not in base.shape:
                problems.append(f"{name}: the base has no tensor {key} (a tied head cannot carry an adapter)")
            elif base.shape[key] != want:
                problems.append(f"{key}: base {base.shape[key]} vs adapter {want}")
            else:
                updates[key] = Update(name)
            continue
        experts_path, _, weight_name = name.rpartition(".")
        fused = f"{experts_path}.{weight_name}"
        want = (experts, unit.out_features, unit.in_features)
        if fused in base.shape:
            if base.shape[fused] != want:
                problems.append(f"{fused}: base {base.shape[fused]} vs adapter {want}")
            else:
                updates[fused] = Update(name)  # the whole [E, out, in] at once
            continue
        moe = _mixtral_expert_keys(experts_path)
        half = unit.out_features // 2
        parts = ({"w1": (0, half), "w3": (half, unit.out_features)} if weight_name == "gate_up_proj"
                 else {"w2": None})
        for expert in range(experts):
            for leaf, rows in parts.items():
                key = f"{moe}.{expert}.{leaf}.weight"
                shape = (unit.out_features if rows is None else rows[1] - rows[0], unit.in_features)
                if key not in base.shape:
                    problems.append(f"{name}: the base has neither {fused} nor {key} (expert tensors are read "
                                    "fused or under Mixtral's block_sparse_moe.experts.{e}.w1/w2/w3 names)")
                elif base.shape[key] != shape:
                    problems.append(f"{key}: base {base.shape[key]} vs adapter {shape}")
                else:
                    updates[key] = Update(name, expert, rows)
    if problems:
        raise ValueError(f"the adapter does not fit the base weights in {base.path} ({len(problems)} problems): "
                         + "; ".join(problems[:6]))
    return updates


@dataclass
class MergePlan:
    """What :func:`write_merged` will write: ``shards`` (file name -> on-disk keys), their sizes, the
    updates, the files copied beside them and the memory bound."""

    base: BaseWeights
    updates: dict[str, Update]
    shards: dict[str, list[str]]
    shard_bytes: dict[str, int]
    copied: dict[str, Path] = field(default_factory=dict)
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_bytes.values())

    def memory_bound(self, adapter_bytes: int) -> int:
        """Peak bytes held beyond the interpreter: the largest output shard + the largest working set of
        one tensor (read in its dtype; for an adapted one also its fp32 copy, ΔW and the fp32 sum) + the
        adapter."""
        def working_set(key: str) -> int:
            fp32 = self.base.nbytes(key) // _BYTES.get(self.base.dtype[key], 4) * 4
            update = self.updates.get(key)
            if update is None:
                return self.base.nbytes(key)
            # fp32 copy + sum, and the cached ΔW: the whole [2I, H] for a Mixtral w1 / w3 half
            return self.base.nbytes(key) + 2 * fp32 + (2 * fp32 if update.rows else fp32)

        return max(self.shard_bytes.values()) + max(map(working_set, self.base.file_of)) + adapter_bytes

    def describe(self, adapter_bytes: int) -> list[str]:
        lines = [f"merged model: {len(self.base.file_of)} tensors, {len(self.updates)} with a RaSA update, "
                 f"{human_size(self.total_bytes)} in {len(self.shards)} shard(s) of <= {human_size(self.max_shard_size)}"]
        lines += [f"  {name}: {len(keys)} tensors, {human_size(self.shard_bytes[name])}"
                  for name, keys in self.shards.items()]
        lines += [f"  {name} (copied from {source.parent})" for name, source in self.copied.items()]
        lines.append(f"memory bound: {human_size(self.memory_bound(adapter_bytes))} (largest shard + one tensor's "
                     f"working set + the adapter, {human_size(adapter_bytes)}), independent of depth")
        return lines


def plan_merged(model, base_dir, config_dir: str | os.PathLike,
                tokenizer_dir: str | os.PathLike | None = None, max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> MergePlan:
    """Plan the merged model of ``model``'s adapter (None: the base alone) over the weights in ``base_dir``
    (a HF directory, or an object with :class:`BaseWeights`' interface; nothing is read but headers): shards in the base's order, ``config.json`` (+ ``generation_config.json``) from
    ``config_dir``, tokenizer files from ``tokenizer_dir`` (default: ``config_dir``, then ``base_dir``)."""
    base = base_dir if hasattr(base_dir, "read") else BaseWeights(base_dir)
    updates = update_map(model, base) if model is not None else {}
    keys = base.keys()
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        nbytes = base.nbytes(key)
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    shards = dict(zip(names, groups))
    plan = MergePlan(base, updates, shards, {n: sum(base.nbytes(k) for k in g) for n, g in shards.items()},
                     max_shard_size=max_shard_size)
    config_dir = Path(config_dir)
    if not (config_dir / "config.json").is_file():
        raise FileNotFoundError(f"{config_dir} has no config.json (pass the base model's HF config directory)")
    for name in CONFIG_FILES:
        if (config_dir / name).is_file():
            plan.copied[name] = config_dir / name
    sources = ([Path(tokenizer_dir)] if tokenizer_dir else
               [config_dir, *([] if hasattr(base_dir, "read") else [Path(base_dir)])])
    if tokenizer_dir and not any((Path(tokenizer_dir) / n).is_file() for n in TOKENIZER_FILES):
        raise FileNotFoundError(f"{tokenizer_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    for source in sources:
        found = {n: source / n for n in TOKENIZER_FILES if (source / n).is_file()}
        if found:
            plan.copied.update(found)
            break
    return plan


class _Deltas:
    """ΔW of adapter units in fp32, one ``[out, in]`` (or ``[E, out, in]``) at a time, the last one kept
    (a Mixtral ``w1`` and ``w3`` share their expert's ``gate_up_proj`` update)."""

    def __init__(self, model):
        self.units = rasa_layers(model)
        self.last: tuple | None = None
        self.value: torch.Tensor | None = None

    @torch.no_grad()
    def __call__(self, update: Update) -> torch.Tensor:
        from ..functional import rasa_delta

        slot = (update.unit, update.expert)
        if self.last != slot:
            unit = self.units[update.unit]
            factors = unit._factors() if update.expert is None else unit._factors(update.expert)
            self.value, self.last = None, None  # free the previous update before computing the next
            self.value, self.last = rasa_delta(*factors).float(), slot
        delta = self.value
        return delta if update.rows is None else delta[update.rows[0]:update.rows[1]]


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_M_MMAP_THRESHOLD = -3


def _map_large_buffers() -> None:
    """Have glibc serve every buffer of 1 MiB or more by its own mmap, returned to the OS when freed.
    Otherwise glibc raises its mmap threshold to the largest buffer freed so far (up to 32 MB), after
    which tensor buffers come from the heap, fragment it and the peak varies by about a shard from run
    to run. Process-wide; costs a page fault per page of each new buffer, nothing for a converter."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 20)


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``) after each shard."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def merged_tensor(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` in fp32 (or better) cast back to W's dtype: :meth:`MergeableUpdate.merge`'s arithmetic."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    return (weight.to(compute) + delta.to(compute).reshape(weight.shape)).to(weight.dtype)


def write_merged(model, plan: MergePlan, out_dir: str | os.PathLike, progress: bool = True) -> dict[str, str]:
    """Write ``plan`` into the (empty, staged) directory ``out_dir``: the shards, the index built from the
    tensors each written shard holds, the copied config and tokenizer files. Returns the weight map."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    _map_large_buffers()
    deltas = _Deltas(model) if model is not None else None
    applied: set[str] = set()
    weight_map: dict[str, str] = {}
    total = 0
    bar = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, desc="merged", disable=not progress)
    for name, keys in plan.shards.items():
        tensors = {}
        for key in keys:
            weight = plan.base.read(key)
            update = plan.updates.get(key)
            if update is not None:
                weight = merged_tensor(weight, deltas(update))
                applied.add(key)
            tensors[key] = weight.contiguous()
            bar.update(plan.base.nbytes(key))
        save_file(tensors, out_dir / name, metadata={"format": "pt"})
        del tensors
        _return_freed_memory()
        with safe_open(out_dir / name, "pt") as handle:  # the index names what the file holds
            for key in handle.keys():
                if key in weight_map:
                    raise ValueError(f"{key} was written twice ({weight_map[key]} and {name})")
                weight_map[key] = name
                total += plan.base.nbytes(key)
    bar.close()
    unapplied = sorted(set(plan.updates) - applied)
    unwritten = sorted(set(plan.base.file_of) - set(weight_map))
    if unapplied or unwritten:
        raise ValueError(f"incomplete merged model: updates not applied {unapplied[:4]}, base tensors not "
                         f"written {unwritten[:4]}")
    if len(plan.shards) > 1:
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    for name, source in plan.copied.items():
        shutil.copyfile(source, out_dir / name)
    return weight_map
