"""Fused RaSA kernels and autograd (the ``csrc/`` torch extension and its torch fallbacks).

* :mod:`.fused` — the autograd Function the layers call (one per group of adapters sharing an input);
* :mod:`.dispatch` — extension kernel or torch fallback per device (``RASA_KERNELS``, ``RASA_FUSED``);
* :mod:`.philox` — the counter-based dropout masks in pure torch (the kernels' oracle and fallback);
* :mod:`.build` — ``python -m rasa_megatron.ops.build`` compiles ``csrc/``.
"""
from .dispatch import draw_dropout_seed, fused_enabled, fused_enabled_for, has_kernel, kernel_mode, load_extension
from .fused import AdapterCall, OutputSlot, fused_accumulate, fused_base_linear, fused_linear, runs_plain_linear

__all__ = ["AdapterCall", "OutputSlot", "draw_dropout_seed", "fused_accumulate", "fused_base_linear", "fused_enabled", "fused_enabled_for",
           "fused_linear",
           "has_kernel", "kernel_mode", "load_extension", "runs_plain_linear"]
