"""Megatron distributed checkpoints (``torch_dist``: ``metadata.json`` + ``.metadata`` + ``*.distcp``) with
RaSA keys, read offline in one process without torch.distributed: the HF adapter of any layout.

The checkpoint stores every tensor in its global view, whatever layout wrote it (the RaSA layers' and
pools' ``sharded_state_dict``): adapter factors under the Megatron module that carries them, either
layer-stacked (``decoder.layers.self_attention.linear_qkv.adapters.q_proj.A_private: [L, r-k, in]``) or
per layer (``decoder.layers.3.…``, Megatron's ``non_homogeneous_layers``), pools under the layout-free
``rasa_pools.<module type>.A_shared: [L, k, in]`` / ``B_shared: [L, out, k]``. Only the adapter keys
are read (torch DCP, ``no_dist``); base weights and optimizer states stay on disk.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..config import RaSAConfig
from .megatron_weights import _head_dim, qkv_split
from .merged import tensor_nbytes
from ..training.state_io import read_json

MEGATRON_METADATA = "metadata.json"
#: the Megatron module carrying an adapter -> the HF module type it adapts
ADAPTER_MODULES = {
    "self_attention.linear_qkv.adapters.q_proj": "self_attn.q_proj",
    "self_attention.linear_qkv.adapters.k_proj": "self_attn.k_proj",
    "self_attention.linear_qkv.adapters.v_proj": "self_attn.v_proj",
    "self_attention.linear_proj.adapter": "self_attn.o_proj",
    "mlp.linear_fc1.adapters.gate_proj": "mlp.gate_proj",
    "mlp.linear_fc1.adapters.up_proj": "mlp.up_proj",
    "mlp.linear_fc2.adapter": "mlp.down_proj",
    # Megatron's SequentialMLP stores its local experts under ``experts.experts.`` with an expert axis
    # (global expert index) before the expert's own tensor: ``[L, E, ...]`` / per layer ``[E, ...]``
    "mlp.experts.experts.linear_fc1.adapters.gate_up_proj": "mlp.experts.gate_up_proj",
    "mlp.experts.experts.linear_fc2.adapter": "mlp.experts.down_proj",
}
#: the registry group of the per-expert-index pools (``rasa_pools.mlp_experts.<weight>_<e>``)
EXPERT_POOL_GROUP = "mlp_experts"
_FACTOR = re.compile(r"^(?:model\d*\.)?decoder\.layers\.(?:(\d+)\.)?(.+)\.(A_private|B_private|diag)$")
_POOL = re.compile(r"^(?:model\d*\.)?rasa_pools\.(.+)\.(A_shared|B_shared)$")


def is_dist_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a Megatron distributed checkpoint directory (``metadata.json`` naming a backend)."""
    try:
        return "sharded_backend" in read_json(Path(path) / MEGATRON_METADATA)
    except (OSError, ValueError, TypeError):
        return False


def resolve_dist_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory of ``path``: itself, or under a Megatron-LM save root the iteration
    ``latest_checkpointed_iteration.txt`` names (``iter_0000500``)."""
    path = Path(path)
    tracker = path / "latest_checkpointed_iteration.txt"
    if not is_dist_checkpoint(path) and tracker.is_file():
        text = tracker.read_text().strip()
        path = path / ("release" if text == "release" else f"iter_{int(text):07d}")
    if not is_dist_checkpoint(path):
        raise FileNotFoundError(f"{path} is not a Megatron distributed checkpoint (no {MEGATRON_METADATA} "
                                "naming a sharded backend)")
    backend = read_json(path / MEGATRON_METADATA)["sharded_backend"]
    if backend != "torch_dist":
        raise ValueError(f"{path}: sharded backend {backend!r}; only 'torch_dist' checkpoints are read")
    return path


def _metadata(path: Path):
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # noqa: BLE001 - torch raises several types for a missing or corrupt .metadata
        raise ValueError(f"{path}: the torch DCP metadata (.metadata) is missing or unreadable ({err})") from err


def _dcp_load(path: Path, state: dict, planner=None) -> None:
    """torch DCP ``load`` of ``state``'s keys from ``path`` in this one process (``no_dist``; its warning
    that no process group exists silenced: that is the point)."""
    import warnings

    from torch.distributed.checkpoint import FileSystemReader, load

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load(state, storage_reader=FileSystemReader(str(path)), planner=planner, no_dist=True)


def _storage_problems(path: Path, metadata) -> list[str]:
    """Data files ``.metadata`` names that are missing or shorter than the items stored in them."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    problems = []
    for name, end in sorted(ends.items()):
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size < end:
            problems.append(f"{name} is truncated ({file.stat().st_size} of at least {end} bytes)")
    return problems


def adapter_from_dist_checkpoint(path: str | os.PathLike, allow_no_adapter: bool = False
                                 ) -> tuple[dict[str, torch.Tensor], RaSAConfig | None, Path]:
    """``(HF adapter tensors, its RaSAConfig, the checkpoint directory)`` of a ``torch_dist`` checkpoint
    with RaSA keys. ``alpha`` (which only sets the initial diagonal) is recorded as ``2 (r - k)``.
    Raises FileNotFoundError / ValueError naming a missing file, an unknown or unsupported adapter key,
    or a checkpoint without adapters (``({}, None, directory)`` for that with ``allow_no_adapter``)."""
    path = resolve_dist_checkpoint(path)
    metadata = _metadata(path)
    tensors_md = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
    wanted, unknown = {}, []
    for key in tensors_md:
        if key.startswith("optimizer."):
            continue
        factor, pool = _FACTOR.match(key), _POOL.match(key)
        if factor and factor.group(2) in ADAPTER_MODULES:
            wanted[key] = ("factor", factor.group(1), ADAPTER_MODULES[factor.group(2)], factor.group(3))
        elif pool and _expert_pool(pool.group(1)):
            wanted[key] = ("pool", _expert_pool(pool.group(1))[1], _expert_pool(pool.group(1))[0], pool.group(2))
        elif pool and not pool.group(1).startswith(EXPERT_POOL_GROUP + "."):
            wanted[key] = ("pool", None, pool.group(1), pool.group(2))
        elif factor or pool or re.search(r"\.(A_private|B_private|A_shared|B_shared)$", key):
            unknown.append(key)
    if unknown:
        raise ValueError(f"{path}: adapter keys of modules this reader does not know: {unknown[:4]} (known: "
                         f"{', '.join(ADAPTER_MODULES)}; Transformer Engine specs are not supported)")
    if not wanted and allow_no_adapter:
        return {}, None, path
    if not wanted:
        raise ValueError(f"{path} holds no RaSA adapter keys (A_private, diag, rasa_pools.*): nothing to convert")
    state = {key: torch.empty(tuple(tensors_md[key].size), dtype=tensors_md[key].properties.dtype) for key in wanted}
    problems = _storage_problems(path, metadata)
    if problems:
        raise FileNotFoundError(f"{path}: {len(problems)} data files are missing or truncated: {'; '.join(problems[:4])}")
    try:
        _dcp_load(path, state)
    except Exception as err:  # noqa: BLE001 - truncated .distcp files raise from deep inside torch
        raise ValueError(f"{path}: reading the adapter failed ({err.__class__.__name__}: {err}); "
                         "is a .distcp file truncated?") from err
    return _hf_adapter(state, wanted) + (path,)


def _expert_pool(name: str) -> tuple[str, int] | None:
    """``mlp_experts.gate_up_proj_3`` -> ``("mlp.experts.gate_up_proj", 3)`` (else None)."""
    match = re.fullmatch(rf"{EXPERT_POOL_GROUP}\.(gate_up_proj|down_proj)_(\d+)", name)
    return (f"mlp.experts.{match.group(1)}", int(match.group(2))) if match else None


def _hf_adapter(state: dict, wanted: dict) -> tuple[dict[str, torch.Tensor], RaSAConfig]:
    out: dict[str, torch.Tensor] = {}
    expert_pools: dict[str, dict[int, torch.Tensor]] = {}
    private, pool_rank, types = 0, 0, set()
    for key, (kind, layer, module_type, name) in wanted.items():
        tensor = state[key]
        types.add(module_type)
        if kind == "pool":
            layers, k = tensor.shape[0], tensor.shape[1 if name == "A_shared" else 2]
            pool_rank = k
            rows = (tensor.reshape(layers * k, tensor.shape[-1]) if name == "A_shared"
                    else tensor.permute(1, 0, 2).reshape(tensor.shape[1], layers * k)).contiguous()
            if layer is None:
                out[f"rasa_pools.{module_type}.{name}"] = rows
            else:  # the pool of expert index ``layer``: stacked [E, ...] as the HF experts' pool
                expert_pools.setdefault(f"rasa_pools.{module_type}.{name}", {})[layer] = rows
            continue
        if name == "A_private":
            private = tensor.shape[-2]
        if layer is not None:
            out[f"model.layers.{layer}.{module_type}.{name}"] = tensor
        else:
            for index in range(tensor.shape[0]):
                out[f"model.layers.{index}.{module_type}.{name}"] = tensor[index].clone()
    for hf_key, by_expert in expert_pools.items():
        if sorted(by_expert) != list(range(len(by_expert))):
            raise ValueError(f"the pools of {hf_key} cover experts {sorted(by_expert)}, not 0..{len(by_expert) - 1}")
        out[hf_key] = torch.stack([by_expert[e] for e in range(len(by_expert))])
    leaves = tuple(sorted({t.rsplit(".", 1)[-1] for t in types if not t.startswith("mlp.experts.")}))
    experts = tuple(sorted(t for t in types if t.startswith("mlp.experts.")))
    r = private + pool_rank
    return out, RaSAConfig(r=r, k=pool_rank, alpha=float(2 * max(private, 1)), target_modules=leaves,
                           target_parameters=experts)


class _SliceLoadPlanner:
    """A torch DCP load planner that fills each buffer of the state dict with the region of its
    checkpoint tensor starting at ``offsets[fqn]`` (a layer of a layer-stacked tensor): only the
    stored chunks overlapping that region are read."""

    def __new__(cls, offsets: dict[str, tuple[int, ...]]):
        from torch.distributed.checkpoint import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        class Planner(DefaultLoadPlanner):
            def create_local_plan(self):
                items = []
                for fqn, buffer in self.state_dict.items():
                    chunk = ChunkStorageMetadata(offsets=torch.Size(offsets[fqn]), sizes=buffer.shape)
                    items += create_read_items_for_chunk_list(fqn, self.metadata.state_dict_metadata[fqn], [chunk])
                return LoadPlan(items)

            def lookup_tensor(self, index):  # the buffer is the region itself, not a sharded tensor
                return self.state_dict[index.fqn]

        return Planner(flatten_state_dict=False, flatten_sharded_tensors=False)


#: HF per-layer tensor -> (Megatron key below ``decoder.layers.``, how to take it from that tensor)
_LAYER_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                "post_attention_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


class DistBaseWeights:
    """The base weights of a ``torch_dist`` checkpoint under HF names, read one layer at a time (each
    layer's slice of the layer-stacked tensors; the other layers stay on disk), converted with the
    inverse of :func:`~rasa_megatron.convert.megatron_weights.hf_to_megatron`'s layout (fused qkv by
    query group, fc1 ``[gate; up]``; MoE experts under Mixtral's on-disk names), the vocabulary truncated to the HF config's ``vocab_size`` (Megatron-LM
    pads it to a multiple of ``make-vocab-size-divisible-by x TP``). The interface of
    :class:`~rasa_megatron.convert.merged.BaseWeights`."""

    def __init__(self, path: str | os.PathLike, hf_config):
        self.path = resolve_dist_checkpoint(path)
        self.hf_config = hf_config
        metadata = _metadata(self.path)
        self._metadata = {k: v for k, v in metadata.state_dict_metadata.items() if hasattr(v, "size")}
        self.experts = getattr(hf_config, "num_local_experts", None) or 0
        self.per_layer = "decoder.layers.0.self_attention.linear_qkv.weight" in self._metadata
        required = ["embedding.word_embeddings.weight", "decoder.final_layernorm.weight",
                    self._layer_key(0, "self_attention.linear_qkv.weight")]
        missing = [k for k in required if k not in self._metadata]
        if missing:
            raise ValueError(f"{self.path} holds no base weights ({missing[0]} missing): pass the HF base (--base)")
        self.layers = hf_config.num_hidden_layers
        stacked = self._metadata[self._layer_key(0, "self_attention.linear_qkv.weight")].size
        if not self.per_layer and stacked[0] != self.layers:
            raise ValueError(f"{self.path} stacks {stacked[0]} layers, the HF config has {self.layers}")
        vocab = self._metadata["embedding.word_embeddings.weight"].size[0]
        if vocab < hf_config.vocab_size:
            raise ValueError(f"{self.path}: the embedding has {vocab} rows, fewer than the HF config's vocab_size "
                             f"{hf_config.vocab_size}")
        self.shape, self.dtype, self.file_of = {}, {}, {}
        self._cached: tuple[int | None, dict] = (-2, {})
        for key, shape, dtype in self._plan():
            self.shape[key], self.dtype[key], self.file_of[key] = shape, dtype, "torch_dist"

    def _layer_key(self, index: int, name: str) -> str:
        return f"decoder.layers.{index}.{name}" if self.per_layer else f"decoder.layers.{name}"

    def _plan(self):
        c = self.hf_config
        d = _head_dim(c)
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[
            self._metadata["embedding.word_embeddings.weight"].properties.dtype]
        h, i = c.hidden_size, c.intermediate_size
        yield "model.embed_tokens.weight", (c.vocab_size, h), dtype
        if self.experts:  # Mixtral's on-disk names: the router and w1 (gate) / w3 (up) / w2 (down) per expert
            mlp = [("block_sparse_moe.gate.weight", (self.experts, h))]
            mlp += [(f"block_sparse_moe.experts.{e}.{w}.weight", shape) for e in range(self.experts)
                    for w, shape in (("w1", (i, h)), ("w2", (h, i)), ("w3", (i, h)))]
        else:
            mlp = [("mlp.gate_proj.weight", (i, h)), ("mlp.up_proj.weight", (i, h)), ("mlp.down_proj.weight", (h, i))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            for key, shape in (("self_attn.q_proj.weight", (c.num_attention_heads * d, h)),
                               ("self_attn.k_proj.weight", (c.num_key_value_heads * d, h)),
                               ("self_attn.v_proj.weight", (c.num_key_value_heads * d, h)),
                               ("self_attn.o_proj.weight", (h, c.num_attention_heads * d)),
                               *mlp, ("input_layernorm.weight", (h,)), ("post_attention_layernorm.weight", (h,))):
                yield p + key, shape, dtype
        yield "model.norm.weight", (h,), dtype
        if not c.tie_word_embeddings:
            yield "lm_head.weight", (c.vocab_size, h), dtype

    def keys(self) -> list[str]:
        return list(self.file_of)

    def nbytes(self, key: str) -> int:
        return tensor_nbytes(self.shape[key], self.dtype[key])

    def _load(self, keys_offsets: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]) -> dict[str, torch.Tensor]:
        state = {key: torch.empty(shape, dtype=self._metadata[key].properties.dtype)
                 for key, (_, shape) in keys_offsets.items()}
        _dcp_load(self.path, state, _SliceLoadPlanner({k: o for k, (o, _) in keys_offsets.items()}))
        return state

    def _layer(self, n: int) -> dict[str, torch.Tensor]:
        """The HF tensors of layer ``n`` (read once, kept until another layer is read)."""
        if self._cached[0] == n:
            return self._cached[1]
        mlp = (["mlp.router.weight", *(f"mlp.experts.experts.{fc}.weight" for fc in ("linear_fc1", "linear_fc2"))]
               if self.experts else ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"])
        names = ["self_attention.linear_qkv.weight", "self_attention.linear_proj.weight", *mlp, *_LAYER_NORMS.values()]
        wanted = {}
        for name in names:
            key = self._layer_key(n, name)
            size = tuple(self._metadata[key].size)
            wanted[key] = ((0,) * len(size), size) if self.per_layer else ((n,) + (0,) * (len(size) - 1), (1, *size[1:]))
        raw = {name: t.reshape(t.shape[1:]) if not self.per_layer else t
               for name, t in zip(names, self._load(wanted).values())}
        q, k, v = qkv_split(raw["self_attention.linear_qkv.weight"], self.hf_config)
        p = f"model.layers.{n}."
        layer = {p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k, p + "self_attn.v_proj.weight": v,
                 p + "self_attn.o_proj.weight": raw["self_attention.linear_proj.weight"]}
        if self.experts:  # experts [E, 2I, H] ([gate; up] per expert) and [E, H, I]
            layer[p + "block_sparse_moe.gate.weight"] = raw["mlp.router.weight"]
            for e in range(self.experts):
                expert = f"{p}block_sparse_moe.experts.{e}."
                gate, up = raw["mlp.experts.experts.linear_fc1.weight"][e].chunk(2)
                layer.update({expert + "w1.weight": gate, expert + "w3.weight": up,
                              expert + "w2.weight": raw["mlp.experts.experts.linear_fc2.weight"][e]})
        else:
            gate, up = raw["mlp.linear_fc1.weight"].chunk(2)
            layer.update({p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                          p + "mlp.down_proj.weight": raw["mlp.linear_fc2.weight"]})
        layer.update({p + hf: raw[mg] for hf, mg in _LAYER_NORMS.items()})
        self._cached = (None, {})  # free the previous layer first
        self._cached = (n, {k: v.contiguous().clone() for k, v in layer.items()})
        return self._cached[1]

    def read(self, key: str) -> torch.Tensor:
        if key.startswith("model.layers."):
            return self._layer(int(key.split(".")[2]))[key]
        source = {"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                  "model.norm.weight": "decoder.final_layernorm.weight", "lm_head.weight": "output_layer.weight"}[key]
        size = tuple(self._metadata[source].size)
        if source != "decoder.final_layernorm.weight":
            size = (self.hf_config.vocab_size, *size[1:])  # padded rows left out
        return self._load({source: ((0,) * len(size), size)})[source]
