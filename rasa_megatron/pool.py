"""RankPool: the shared ``A_S`` / ``B_S`` of one module type (paper eq. 3)."""
from __future__ import annotations

import torch
from torch import nn

from .functional import kaiming_init_


def init_on_cpu_then_move_(module: nn.Module, device) -> None:
    """``module.reset_parameters()`` on its own parameters while they are on the CPU (drawn from the
    CPU generator), then those parameters moved to ``device``: the same seed gives the same adapter
    whatever device the base model lives on (a GPU under ZeRO-3's ``zero.Init``), as the Megatron path,
    which draws full-size tensors on the CPU, does. On the meta device (dry runs: no values) nothing
    is drawn."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "meta":
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
        return
    module.reset_parameters()
    if device.type != "cpu":
        for name, param in module._parameters.items():
            if param is not None:
                module._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)


class RankPool(nn.Module):
    """The pool of ``L*k`` ranks that every layer of one module type (e.g. all ``q_proj``) uses.

    It is registered once in the model (under ``rasa_pools``); each :class:`RaSALinear` of the
    module type holds an unregistered reference to it, so the pool appears once in the state dict
    and in the optimizer, and its gradient is the sum over layers.

    For stacked MoE expert weights (``num_experts = E``) there is one pool per expert index:
    expert ``e`` of every layer shares ``A_shared[e]`` / ``B_shared[e]``.

    Attributes:
        A_shared: ``[pool_rank, in_features]`` (``[E, pool_rank, in_features]``), Kaiming-uniform.
        B_shared: ``[out_features, pool_rank]`` (``[E, out_features, pool_rank]``), zeros at init.
    """

    def __init__(self, in_features: int, out_features: int, pool_rank: int, num_layers: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 num_experts: int = 0):
        super().__init__()
        if pool_rank <= 0:
            raise ValueError(f"a RankPool needs pool_rank >= 1, got {pool_rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.pool_rank = pool_rank
        self.num_layers = num_layers
        self.num_experts = num_experts
        lead = (num_experts,) if num_experts else ()
        self.A_shared = nn.Parameter(torch.empty(*lead, pool_rank, in_features, dtype=dtype))
        self.B_shared = nn.Parameter(torch.empty(*lead, out_features, pool_rank, dtype=dtype))
        init_on_cpu_then_move_(self, device)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        if self.A_shared.device.type == "meta":
            return
        for A in (self.A_shared if self.num_experts else [self.A_shared]):
            kaiming_init_(A, generator)
        self.B_shared.zero_()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"pool_rank={self.pool_rank} ({self.num_layers} layers"
                + (f", {self.num_experts} experts)" if self.num_experts else ")"))
