"""The Megatron DDP settings RaSA supports."""
from __future__ import annotations

from .sharding import as_chunks


def check_megatron_ddp(model) -> None:
    """Refuse Megatron DDP settings under which RaSA's gradient/pool steps would race Megatron's:

    * ``overlap_grad_reduce``: a bucket's data-parallel reduction starts from autograd hooks, but
      pool and TP-partial gradients are completed later, by :func:`finalize_rasa_grads` (and pool
      parameters get no autograd hook at all: their gradient arrives through the gathered pool);
    * ``overlap_param_gather``: the distributed optimizer's parameter all-gather is finished in
      forward pre-hooks, which never run for the pool modules whose slices
      :func:`gather_pipeline_pools` reads before the first forward.
    RaSA's gradients are ~1% of the model's; their non-overlapped reduction is cheap.
    """
    for chunk in as_chunks(model):
        ddp_config = getattr(chunk, "ddp_config", None)
        for flag in ("overlap_grad_reduce", "overlap_param_gather"):
            if ddp_config is not None and getattr(ddp_config, flag, False):
                raise ValueError(f"DistributedDataParallelConfig({flag}=True) is not supported with RaSA adapters "
                                 f"(see rasa_megatron.megatron.check_megatron_ddp); set {flag}=False")
