"""Hugging Face Llama/Mistral/Mixtral <-> Megatron-core GPTModel (local spec) base weights, per TP x PP
(x EP for MoE) rank.

Keys (HF ``model.layers.{i}.`` -> Megatron ``decoder.layers.{local i}.``; norms are ``torch.nn.RMSNorm``
``weight`` in the local spec):

* ``model.embed_tokens.weight`` -> ``embedding.word_embeddings.weight`` (first stage)
* ``input_layernorm.weight`` -> ``input_layernorm.weight``
* ``self_attn.{q,k,v}_proj.weight`` -> ``self_attention.linear_qkv.weight``
* ``self_attn.o_proj.weight`` -> ``self_attention.linear_proj.weight``
* ``post_attention_layernorm.weight`` -> ``pre_mlp_layernorm.weight``
* ``mlp.{gate,up}_proj.weight`` -> ``mlp.linear_fc1.weight``; ``mlp.down_proj.weight`` -> ``mlp.linear_fc2.weight``
* Mixtral MoE (``E`` experts, SequentialMLP): ``mlp.gate.weight`` ``[E, H]`` -> ``mlp.router.weight``;
  ``mlp.experts.gate_up_proj[e]`` ``[2I, H]`` / ``mlp.experts.down_proj[e]`` ``[H, I]`` ->
  ``mlp.experts.local_experts.{j}.linear_fc1.weight`` / ``linear_fc2.weight`` on EP rank ``e // (E/ep)``,
  ``j = e % (E/ep)``; experts are not TP-split (expert tensor parallel size 1), so every TP rank holds them whole
* ``model.norm.weight`` -> ``decoder.final_layernorm.weight`` (last stage)
* ``lm_head.weight`` (or, tied, ``model.embed_tokens.weight``) -> ``output_layer.weight`` (last stage;
  absent when tied and first == last stage: Megatron's output layer then reads the embedding)

Layouts (``g`` query groups, ``h/g`` query heads per group, ``d`` head dim, ``tp`` TP ranks):

* ``linear_qkv.weight``: per query group ``[its h/g query heads ; its key head ; its value head]``,
  rows ``[g (h/g + 2) d, hidden]``; TP rank ``t`` holds groups ``[t g/tp, (t+1) g/tp)``.
* ``linear_fc1.weight`` (SwiGLU): on TP rank ``t``, ``[gate rows of t ; up rows of t]``.
* ``linear_proj`` / ``linear_fc2``: split on the input dim; embeddings / output layer: split on
  the vocabulary, which ``tp`` must divide (Megatron-core's VocabParallelEmbedding asserts it and
  GPTModel pads nothing; Megatron-LM's scripts pad the tokenizer's vocabulary before building it).
* PP rank ``p`` (of ``pp``, virtual stage ``v`` of ``vpp``) runs layers
  ``[(v pp + p) L_c, (v pp + p + 1) L_c)``, ``L_c = L / (pp vpp)``, numbered locally from 0.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..parallel_layout import check_divisible, check_parallel_sizes, stage_layers

HF_LAYER = "model.layers.{}."


def rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    if params and isinstance(params, dict) and params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type {params.get('rope_type')!r} (rope scaling) is not converted; only 'default' rope is")
    return float(theta if theta is not None else getattr(hf_config, "rope_theta", 10000.0))


def _sliding_window(hf_config) -> int | None:
    """HF Mistral/Mixtral ``sliding_window`` (each query sees itself and the ``w - 1`` keys before it), or None."""
    window = getattr(hf_config, "sliding_window", None)
    if window is None or not getattr(hf_config, "use_sliding_window", True):
        return None
    if getattr(hf_config, "layer_types", None) and len(set(hf_config.layer_types)) > 1:
        raise ValueError(f"layer_types {sorted(set(hf_config.layer_types))} (alternating attention) is not converted")
    if window < 1:
        raise ValueError(f"sliding_window = {window} must be at least 1")
    return int(window)


def _has_qkv_bias(hf_config) -> bool:
    """Qwen2 has q/k/v biases without an ``attention_bias`` flag; Llama/Mistral declare theirs."""
    return bool(getattr(hf_config, "attention_bias", getattr(hf_config, "model_type", None) == "qwen2"))


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def transformer_config_from_hf(hf_config, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                               sequence_parallel: bool = False, params_dtype: torch.dtype = torch.float32,
                               **overrides):
    """A Megatron ``TransformerConfig`` equal in function to a HF Llama/Mistral config (RMSNorm,
    SwiGLU, no linear bias, GQA with ``kv_channels = head_dim``, Mistral's sliding window as
    ``window_size = (w - 1, 0)``, HF's attention dropout), CPU-initialisable, all CUDA-only fusions
    off. Rope (``rotary_base``) is a GPTModel argument: see :func:`rasa_megatron.megatron.model.build_gpt_model`. Raises a
    ValueError naming both numbers when a parallel size does not divide what it splits, and for
    biases, non-SiLU activations and rope scaling."""
    from megatron.core.transformer import TransformerConfig

    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf_config.hidden_act!r} is not supported; Llama-style models use 'silu'")
    if _has_qkv_bias(hf_config) or getattr(hf_config, "mlp_bias", False):
        raise ValueError(f"model_type {getattr(hf_config, 'model_type', None)!r} has attention or MLP biases, "
                         "which are not converted")
    rope_theta(hf_config)  # rejects rope scaling here rather than at model build
    check_parallel_sizes(hf_config, tensor_model_parallel_size, pipeline_model_parallel_size,
                         overrides.get("virtual_pipeline_model_parallel_size") or 1)
    fields = dict(
        num_layers=hf_config.num_hidden_layers, hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads, num_query_groups=hf_config.num_key_value_heads,
        kv_channels=_head_dim(hf_config), ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm", layernorm_epsilon=hf_config.rms_norm_eps, gated_linear_unit=True,
        activation_func=F.silu, add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size, sequence_parallel=sequence_parallel,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, use_cpu_initialization=True,
        bias_activation_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, persist_layer_norm=False, bias_dropout_fusion=False,
    )
    window = _sliding_window(hf_config)
    if window is not None:  # Megatron's (left, right) window: keys [i - left, i + right] for query i
        fields["window_size"] = (window - 1, 0)
    experts = getattr(hf_config, "num_local_experts", None)
    if experts:  # Mixtral: top-k on the router logits then softmax over the k == HF's softmax, top-k, renormalise
        fields.update(num_moe_experts=experts, moe_router_topk=hf_config.num_experts_per_tok,
                      moe_ffn_hidden_size=hf_config.intermediate_size, moe_token_dispatcher_type="allgather",
                      moe_router_load_balancing_type="aux_loss" if hf_config.output_router_logits else "none",
                      moe_aux_loss_coeff=hf_config.router_aux_loss_coef if hf_config.output_router_logits else 0.0)
    fields.update(overrides)
    return TransformerConfig(**fields)


def _qkv_full(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """HF q ``[h d, H]``, k/v ``[g d, H]`` -> Megatron fused ``[g (h/g + 2) d, H]``."""
    hidden = q.shape[-1]
    return torch.cat([q.reshape(groups, -1, hidden), k.reshape(groups, -1, hidden), v.reshape(groups, -1, hidden)],
                     dim=1).reshape(-1, hidden)


def hf_to_megatron(hf_state, hf_config, tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1,
                   vp_stage: int = 0, vpp_size: int = 1, ep_rank: int = 0, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """The base-weight state dict of the Megatron GPTModel chunk on (tp_rank, pp_rank, vp_stage) and,
    for Mixtral-style MoE (expert tensor parallel size 1), expert-parallel rank ``ep_rank``: its
    ``E / ep_size`` local experts ``mlp.experts.local_experts.{j}`` hold HF experts
    ``ep_rank E / ep_size + j`` (``linear_fc1 = gate_up_proj[e]`` ``[2I, H]``, ``linear_fc2 = down_proj[e]``).

    ``hf_state``: a dict of HF tensors, or a :class:`~rasa_megatron.convert.hf_checkpoint.SafetensorsCheckpoint`
    of which only this rank's slices are read (``get_slice``: TP shards, local experts)."""
    return {key: source() for key, source in hf_to_megatron_sources(
        hf_state, hf_config, tp_rank, tp_size, pp_rank, pp_size, vp_stage, vpp_size, ep_rank, ep_size).items()}


def hf_to_megatron_sources(hf_state, hf_config, tp_rank: int, tp_size: int, pp_rank: int = 0, pp_size: int = 1,
                           vp_stage: int = 0, vpp_size: int = 1, ep_rank: int = 0, ep_size: int = 1
                           ) -> dict[str, Callable[[], torch.Tensor]]:
    """:func:`hf_to_megatron`'s state dict as zero-argument functions, each reading and converting its
    one tensor when called (nothing is read before): what a streamed writer holds."""
    check_parallel_sizes(hf_config, tp_size, pp_size, vpp_size)
    for name, rank, size in (("tp_rank", tp_rank, tp_size), ("pp_rank", pp_rank, pp_size),
                             ("vp_stage", vp_stage, vpp_size), ("ep_rank", ep_rank, ep_size)):
        if not 0 <= rank < size:
            raise ValueError(f"{name} = {rank} is outside [0, {size})")
    biases = [key for key in (HF_LAYER.format(0) + "self_attn.q_proj.bias", HF_LAYER.format(0) + "mlp.down_proj.bias")
              if key in hf_state]
    if biases:
        raise ValueError(f"the HF state has biases ({biases[0]}, ...), which the bias-free Megatron layers cannot hold")
    num_experts = getattr(hf_config, "num_local_experts", None) or 0
    local_experts = check_divisible(num_experts, ep_size, "num_local_experts", "expert-parallel size") if num_experts else 0
    groups = hf_config.num_key_value_heads
    last_chunk = pp_rank == pp_size - 1 and vp_stage == vpp_size - 1
    first_chunk = pp_rank == 0 and vp_stage == 0
    tied = bool(hf_config.tie_word_embeddings)

    def shard(key, dim):  # this TP rank's part only: a checkpoint reader reads nothing else
        return partial(_read, hf_state, key, dim, tp_rank, tp_size)

    def whole(key):
        return partial(_read, hf_state, key)

    def qkv(src):  # rank t holds query groups [t g/tp, (t+1) g/tp): contiguous rows of q, k and v alike
        parts = [shard(src + f"self_attn.{name}_proj.weight", 0) for name in "qkv"]
        return lambda: _qkv_full(*(part() for part in parts), groups // tp_size)

    def expert(src, name, e):
        return lambda: _read(hf_state, src + f"mlp.experts.{name}", 0, e, num_experts)[0]

    def fc1(src):
        gate, up = shard(src + "mlp.gate_proj.weight", 0), shard(src + "mlp.up_proj.weight", 0)
        return lambda: torch.cat([gate(), up()])

    out = {}
    if first_chunk:
        out["embedding.word_embeddings.weight"] = shard("model.embed_tokens.weight", 0)
    for local, index in enumerate(stage_layers(hf_config.num_hidden_layers, pp_rank, pp_size, vp_stage, vpp_size)):
        src, dst = HF_LAYER.format(index), f"decoder.layers.{local}."
        out[dst + "self_attention.linear_qkv.weight"] = qkv(src)
        out[dst + "input_layernorm.weight"] = whole(src + "input_layernorm.weight")
        out[dst + "self_attention.linear_proj.weight"] = shard(src + "self_attn.o_proj.weight", 1)
        out[dst + "pre_mlp_layernorm.weight"] = whole(src + "post_attention_layernorm.weight")
        if num_experts:
            out[dst + "mlp.router.weight"] = whole(src + "mlp.gate.weight")
            for j in range(local_experts):
                e = ep_rank * local_experts + j
                out[dst + f"mlp.experts.local_experts.{j}.linear_fc1.weight"] = expert(src, "gate_up_proj", e)
                out[dst + f"mlp.experts.local_experts.{j}.linear_fc2.weight"] = expert(src, "down_proj", e)
            continue
        out[dst + "mlp.linear_fc1.weight"] = fc1(src)
        out[dst + "mlp.linear_fc2.weight"] = shard(src + "mlp.down_proj.weight", 1)
    if last_chunk:
        out["decoder.final_layernorm.weight"] = whole("model.norm.weight")
        if not (tied and first_chunk):  # tied on one stage: the output layer reads the embedding
            # tied across stages: Megatron's last-stage copy
            out["output_layer.weight"] = shard("model.embed_tokens.weight" if tied else "lm_head.weight", 0)
    return out


def _read(hf_state, key: str, dim: int | None = None, part: int = 0, parts: int = 1) -> torch.Tensor:
    """``hf_state[key]``, or its ``part``-th of ``parts`` chunks along ``dim``, as a tensor of its own.
    A checkpoint reader (:class:`~rasa_megatron.convert.hf_checkpoint.SafetensorsCheckpoint`) reads only
    that chunk from disk; a plain dict of tensors is sliced."""
    if hasattr(hf_state, "read"):
        return hf_state.read(key, dim, part, parts).contiguous()
    tensor = hf_state[key]
    return (tensor if dim is None else tensor.chunk(parts, dim=dim)[part]).clone()


def qkv_split(qkv: torch.Tensor, hf_config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of :func:`_qkv_full`: Megatron fused ``[g (h/g + 2) d, H]`` (whole, or a TP rank's
    query groups) -> HF q ``[h d, H]``, k and v ``[g d, H]`` (copies)."""
    hidden, d = qkv.shape[-1], _head_dim(hf_config)
    q_rows = hf_config.num_attention_heads // hf_config.num_key_value_heads * d
    grouped = qkv.reshape(-1, q_rows + 2 * d, hidden)
    return tuple(part.reshape(-1, hidden).clone() for part in
                 (grouped[:, :q_rows], grouped[:, q_rows:q_rows + d], grouped[:, q_rows + d:]))


def megatron_to_hf(states: dict[tuple, dict], hf_config) -> dict[str, torch.Tensor]:
    """The exact inverse of :func:`hf_to_megatron`.

    Args:
        states: ``{(tp_rank, pp_rank) | (tp_rank, pp_rank, vp_stage) | (tp_rank, pp_rank, vp_stage, ep_rank):
            state dict}`` covering every rank (a missing ``vp_stage`` / ``ep_rank`` is 0). MoE: ``ep_size`` is
            ``1 +`` the largest ``ep_rank``; attention, norms and embeddings come from EP rank 0, experts from TP
            rank 0, stacked back into ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``.
    """
    num_experts = getattr(hf_config, "num_local_experts", None) or 0
    keys = {(k + (0, 0))[:4] for k in states}
    d = _head_dim(hf_config)
    full_qkv = (hf_config.num_attention_heads + 2 * hf_config.num_key_value_heads) * d
    local_qkv = next(iter(states.values()))["decoder.layers.0.self_attention.linear_qkv.weight"].shape[0]
    if full_qkv % local_qkv:
        raise ValueError(f"a linear_qkv shard has {local_qkv} rows, which does not divide the model's {full_qkv}; "
                         "the states do not belong to this HF config")
    tp_size = full_qkv // local_qkv  # from the shard shapes, so a missing TP rank cannot pass unnoticed
    pp_size = 1 + max(k[1] for k in keys)
    vpp_size = 1 + max(k[2] for k in keys)
    ep_size = 1 + max(k[3] for k in keys)
    if ep_size > 1 and not num_experts:
        raise ValueError(f"the states have {ep_size} expert-parallel ranks, the HF config has no experts")
    local_experts = check_divisible(num_experts, ep_size, "num_local_experts", "expert-parallel size") if num_experts else 0
    local_layers = len({key.split(".")[2] for key in next(iter(states.values())) if key.startswith("decoder.layers.")})
    if local_layers * pp_size * vpp_size != hf_config.num_hidden_layers:
        raise ValueError(f"the states hold {local_layers} layers per chunk on {pp_size} pipeline x {vpp_size} virtual "
                         f"stages, the model has {hf_config.num_hidden_layers} layers: pipeline ranks are missing")
    check_parallel_sizes(hf_config, tp_size, pp_size, vpp_size)
    ranks = [(t, p, v, e) for t in range(tp_size) for p in range(pp_size) for v in range(vpp_size)
             for e in range(ep_size)]
    missing = [rank for rank in ranks if rank not in keys]
    if missing:
        if num_experts:
            raise ValueError(f"megatron_to_hf needs every rank's state; missing (tp, pp, vp, ep) = {missing[:4]}")
        missing = [rank[:3] for rank in missing]
        raise ValueError(f"megatron_to_hf needs every rank's state; missing (tp, pp, vp) = {missing[:4]}")
    state = {(k + (0, 0))[:4]: v for k, v in states.items()}
    experts_prefix = "decoder.layers.0.mlp.experts.local_experts."
    for rank in ranks if num_experts else ():
        held = len({key[len(experts_prefix):].split(".")[0] for key in state[rank] if key.startswith(experts_prefix)})
        if held != local_experts:
            raise ValueError(f"the state of (tp, pp, vp, ep) = {rank} holds {held} experts per layer; "
                             f"num_local_experts = {num_experts} on expert-parallel size = {ep_size} needs "
                             f"{local_experts}: expert-parallel ranks are missing")
    def cat(key, dim, p=0, v=0):
        return torch.cat([state[(t, p, v, 0)][key] for t in range(tp_size)], dim=dim)

    out = {"model.embed_tokens.weight": cat("embedding.word_embeddings.weight", 0)}
    for p in range(pp_size):
        for v in range(vpp_size):
            for local, index in enumerate(stage_layers(hf_config.num_hidden_layers, p, pp_size, v, vpp_size)):
                src, dst = f"decoder.layers.{local}.", HF_LAYER.format(index)
                (out[dst + "self_attn.q_proj.weight"], out[dst + "self_attn.k_proj.weight"],
                 out[dst + "self_attn.v_proj.weight"]) = qkv_split(
                    cat(src + "self_attention.linear_qkv.weight", 0, p, v), hf_config)
                out[dst + "self_attn.o_proj.weight"] = cat(src + "self_attention.linear_proj.weight", 1, p, v)
                if num_experts:  # experts of EP rank e, TP rank 0 (not TP-split): HF experts e E/ep + j
                    out[dst + "mlp.gate.weight"] = state[(0, p, v, 0)][src + "mlp.router.weight"].clone()
                    for name, fc in (("gate_up_proj", "linear_fc1"), ("down_proj", "linear_fc2")):
                        out[dst + "mlp.experts." + name] = torch.stack(
                            [state[(0, p, v, e)][src + f"mlp.experts.local_experts.{j}.{fc}.weight"]
                             for e in range(ep_size) for j in range(local_experts)])
                else:
                    fc1 = [state[(t, p, v, 0)][src + "mlp.linear_fc1.weight"].chunk(2) for t in range(tp_size)]
                    out[dst + "mlp.gate_proj.weight"] = torch.cat([g for g, _ in fc1])
                    out[dst + "mlp.up_proj.weight"] = torch.cat([u for _, u in fc1])
                    out[dst + "mlp.down_proj.weight"] = cat(src + "mlp.linear_fc2.weight", 1, p, v)
                out[dst + "input_layernorm.weight"] = state[(0, p, v, 0)][src + "input_layernorm.weight"].clone()
                out[dst + "post_attention_layernorm.weight"] = state[(0, p, v, 0)][
                    src + "pre_mlp_layernorm.weight"].clone()
    last = (pp_size - 1, vpp_size - 1)
    out["model.norm.weight"] = state[(0, *last, 0)]["decoder.final_layernorm.weight"].clone()
    if not hf_config.tie_word_embeddings:
        out["lm_head.weight"] = cat("output_layer.weight", 0, *last)
    return out
