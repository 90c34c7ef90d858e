"""Which model dimensions a parallel layout splits, and whether it can (framework-free arithmetic).

Used by recipe validation, the converters and the Megatron layers alike, so every place that
refuses a layout names the same numbers.
"""
from __future__ import annotations


def check_divisible(value: int, by: int, what: str, by_what: str) -> int:
    """``value // by``, or a ValueError naming both numbers and the valid choices."""
    if by <= 0 or value % by:
        raise ValueError(f"{what} = {value} is not divisible by {by_what} = {by}; choose {by_what} among "
                         f"the divisors of {value}: {[d for d in range(1, value + 1) if value % d == 0]}")
    return value // by


def check_parallel_sizes(hf_config, tp: int, pp: int, vpp: int = 1) -> None:
    """Raise a ValueError naming both numbers when a parallel size does not divide what it splits
    (``hf_config``: a Hugging Face Llama/Mistral/Mixtral config)."""
    check_divisible(hf_config.num_attention_heads, tp, "num_attention_heads", "tensor-parallel size")
    check_divisible(hf_config.num_key_value_heads, tp, "num_key_value_heads", "tensor-parallel size")
    check_divisible(hf_config.intermediate_size, tp, "intermediate_size", "tensor-parallel size")
    check_divisible(hf_config.vocab_size, tp, "vocab_size", "tensor-parallel size")
    check_divisible(hf_config.num_hidden_layers, pp * vpp, "num_hidden_layers",
                    "pipeline-parallel size x virtual stages" if vpp > 1 else "pipeline-parallel size")


def stage_layers(num_layers: int, pp_rank: int, pp_size: int, vp_stage: int = 0, vpp_size: int = 1) -> range:
    """Global indices of the layers of one (pipeline rank, virtual stage): rank ``p`` of ``pp``, virtual
    stage ``v`` of ``vpp`` runs ``[(v pp + p) L_c, (v pp + p + 1) L_c)`` with ``L_c = L / (pp vpp)``."""
    per_chunk = check_divisible(num_layers, pp_size * vpp_size, "num_hidden_layers", "pipeline stages x virtual stages")
    start = (vp_stage * pp_size + pp_rank) * per_chunk
    return range(start, start + per_chunk)
