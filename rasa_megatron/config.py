"""RaSA configuration: ranks, scaling, dropout and target modules, validated at construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def default_shared_rank(r: int) -> int:
    """The paper's default number of ranks each layer gives to the pool: ``max(r // 8, 1)``."""
    return max(r // 8, 1)


@dataclass(frozen=True)
class RaSAConfig:
    """Hyper-parameters of a RaSA adapter.

    Args:
        r: LoRA-equivalent rank per layer (parameter budget), ``r >= 1``.
        k: ranks each layer contributes to the shared pool, ``0 <= k <= r``;
            ``None`` means the paper's default ``max(r // 8, 1)``. ``k = 0`` is LoRA with a
            trainable diagonal, ``k = r`` shares every rank.
        alpha: scaling numerator; D starts at ``alpha / (2 (r - k))`` on private ranks and
            ``alpha / (2 L k)`` on pooled ranks (paper eq. 6).
        dropout: dropout probability on the adapter input, ``0 <= dropout < 1``.
        target_modules: names of the linear layers inside each decoder layer to adapt
            (matched against the last component of the module path); may be empty when
            ``target_parameters`` is not.
        target_parameters: stacked MoE expert weights to adapt, as in PEFT: a dotted suffix of
            ``<module path>.<parameter name>`` inside a decoder layer, e.g.
            ``"mlp.experts.gate_up_proj"`` or ``"experts.down_proj"`` (transformers 5 Mixtral).
    """

    r: int = 8
    k: int | None = None
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = field(default=LLAMA_LINEARS)
    target_parameters: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"RaSAConfig.r must be a positive integer, got r={self.r!r}")
        k = default_shared_rank(self.r) if self.k is None else self.k
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= self.r:
            raise ValueError(
                f"RaSAConfig.k must be an integer with 0 <= k <= r={self.r}, got k={self.k!r}"
            )
        object.__setattr__(self, "k", k)
        if not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"RaSAConfig.alpha must be a positive number, got alpha={self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"RaSAConfig.dropout must be in [0, 1), got dropout={self.dropout!r}")
        for attr in ("target_modules", "target_parameters"):
            value = getattr(self, attr)
            if isinstance(value, str):
                raise ValueError(f"RaSAConfig.{attr} must be a sequence of names, got the string {value!r}; "
                                 f"write ({value!r},)")
            names = tuple(value)
            if not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"RaSAConfig.{attr} must be non-empty names, got {names!r}")
            if len(set(names)) != len(names):
                raise ValueError(f"RaSAConfig.{attr} has duplicates: {names!r}")
            object.__setattr__(self, attr, names)
        if not self.target_modules and not self.target_parameters:
            raise ValueError("RaSAConfig needs non-empty target_modules or target_parameters; both are empty")

    @property
    def private_rank(self) -> int:
        """Ranks kept by each layer, ``r - k``."""
        return self.r - self.k

    def pool_rank(self, num_layers: int) -> int:
        """Ranks in the pool of a module type present in ``num_layers`` layers, ``L k``."""
        return num_layers * self.k

    def effective_rank(self, num_layers: int) -> int:
        """Rank of each layer's update, ``r - k + L k``."""
        return self.private_rank + self.pool_rank(num_layers)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        out["target_parameters"] = list(self.target_parameters)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "RaSAConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown RaSAConfig keys {unknown}; valid keys are {sorted(known)}")
        data = dict(data)
        for attr in ("target_modules", "target_parameters"):
            if attr in data:
                data[attr] = tuple(data[attr])
        return cls(**data)
