"""OmniMoEConfig: the fields of SPEC §1, validated once, serialised as config.json."""
from __future__ import annotations

import dataclasses
import math

from .errors import OmniMoEInputError

ACTIVATIONS = ("silu", "gelu", "relu", "gelu_tanh")
GATES = ("product", "softmax")
ROUTER_NORMS = ("batchnorm", "none")


def dataclass_kwargs(cls, data: dict) -> dict:
    """The config.json fields of dataclass `cls`: unknown or missing fields are bad input."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - fields - {"model_type"}
    if unknown:
        raise OmniMoEInputError(f"config has unknown fields: {sorted(unknown)}")
    required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
    missing = required - set(data)
    if missing:
        raise OmniMoEInputError(f"config is missing fields: {sorted(missing)}")
    return {k: v for k, v in data.items() if k in fields}


def expert_grid_side(num_experts: int) -> int:
    """s = sqrt(N); N must be a perfect square because experts live on an s x s grid."""
    s = math.isqrt(num_experts) if num_experts > 0 else 0
    if num_experts <= 0 or s * s != num_experts:
        raise OmniMoEInputError(f"num_experts must be a positive perfect square, got {num_experts}")
    return s


@dataclasses.dataclass
class OmniMoEConfig:
    hidden_size: int
    num_experts: int
    top_k: int
    intermediate_size: int = 0
    hidden_act: str = "silu"
    router_norm: str = "batchnorm"
    gate: str = "product"
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise OmniMoEInputError(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 0:
            raise OmniMoEInputError(f"intermediate_size must be >= 0, got {self.intermediate_size!r}")
        expert_grid_side(self.num_experts)
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise OmniMoEInputError(
                f"top_k must satisfy 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k!r}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise OmniMoEInputError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.router_norm not in ROUTER_NORMS:
            raise OmniMoEInputError(f"router_norm must be one of {ROUTER_NORMS}, got {self.router_norm!r}")
        if self.gate not in GATES:
            raise OmniMoEInputError(f"gate must be one of {GATES}, got {self.gate!r}")
        if not (isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0):
            raise OmniMoEInputError(f"norm_eps must be > 0, got {self.norm_eps!r}")

    @property
    def grid_side(self) -> int:
        return expert_grid_side(self.num_experts)

    def to_dict(self) -> dict:
        return {"model_type": "omnimoe_layer", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "OmniMoEConfig":
        return cls(**dataclass_kwargs(cls, data))
