"""OmniMoEConfig: the fields of SPEC §1, validated once, serialised as config.json."""
from __future__ import annotations

import dataclasses
import math

from .errors import OmniMoEInputError

ACTIVATIONS = ("silu", "gelu", "relu", "gelu_tanh")
GATES = ("product", "softmax")
ROUTER_NORMS = ("batchnorm", "none")


# Sizes are int32 on every path (ONNX indices, TensorRT plugin fields, kernels' offsets).
MAX_DIM = 2**31 - 1
_JSON_TYPES = {"int": "an integer", "float": "a number", "str": "a string"}


def is_int(value) -> bool:
    """A JSON/Python integer; booleans are not integers here."""
    return isinstance(value, int) and not isinstance(value, bool)


def _magnitude(value: int) -> str:
    return str(value) if abs(value) < 10**15 else f"~2^{abs(value).bit_length() - 1}"


def _check_json_type(name: str, kind: str, value) -> None:
    if kind == "int":
        ok = is_int(value)
    elif kind == "float":
        ok = (is_int(value) or isinstance(value, float)) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise OmniMoEInputError(f"config field {name} must be {_JSON_TYPES[kind]}{' (finite)' if kind == 'float' else ''}, "
                                f"got {type(value).__name__} {value!r:.60}")
    if kind == "int" and not -MAX_DIM <= value <= MAX_DIM:
        raise OmniMoEInputError(f"config field {name} = {_magnitude(value)} is too large (at most {MAX_DIM})")


def dataclass_kwargs(cls, data: dict) -> dict:
    """The config.json fields of dataclass `cls`: unknown or missing fields are bad input, and each
    field must have its JSON type (booleans are not integers, integers fit in int32)."""
    if not isinstance(data, dict):
        raise OmniMoEInputError(f"config must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields) - {"model_type"}
    if unknown:
        raise OmniMoEInputError(f"config has unknown fields: {sorted(unknown)}")
    required = {name for name, f in fields.items() if f.default is dataclasses.MISSING}
    missing = required - set(data)
    if missing:
        raise OmniMoEInputError(f"config is missing fields: {sorted(missing)}")
    for name, value in data.items():
        kind = fields[name].type if name in fields else None
        if kind in _JSON_TYPES:
            _check_json_type(name, kind, value)
    return {k: v for k, v in data.items() if k in fields}


def expert_grid_side(num_experts: int) -> int:
    """s = sqrt(N); N must be a perfect square because experts live on an s x s grid."""
    s = math.isqrt(num_experts) if is_int(num_experts) and num_experts > 0 else 0
    if s == 0 or s * s != num_experts:
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
        if not is_int(self.hidden_size) or self.hidden_size <= 0:
            raise OmniMoEInputError(f"hidden_size must be a positive integer, got {self.hidden_size!r}")
        if not is_int(self.intermediate_size) or self.intermediate_size < 0:
            raise OmniMoEInputError(f"intermediate_size must be >= 0, got {self.intermediate_size!r}")
        expert_grid_side(self.num_experts)
        if not is_int(self.top_k) or not 1 <= self.top_k <= self.num_experts:
            raise OmniMoEInputError(
                f"top_k must satisfy 1 <= top_k <= num_experts={self.num_experts}, got {self.top_k!r}"
            )
        for name in ("hidden_size", "intermediate_size", "num_experts"):
            if getattr(self, name) > MAX_DIM:
                raise OmniMoEInputError(f"{name} = {_magnitude(getattr(self, name))} is too large (at most {MAX_DIM})")
        if self.hidden_act not in ACTIVATIONS:
            raise OmniMoEInputError(f"hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        if self.router_norm not in ROUTER_NORMS:
            raise OmniMoEInputError(f"router_norm must be one of {ROUTER_NORMS}, got {self.router_norm!r}")
        if self.gate not in GATES:
            raise OmniMoEInputError(f"gate must be one of {GATES}, got {self.gate!r}")
        eps = self.norm_eps
        if not ((is_int(eps) or isinstance(eps, float)) and math.isfinite(eps) and eps > 0):
            raise OmniMoEInputError(f"norm_eps must be a finite number > 0, got {eps!r}")

    @property
    def grid_side(self) -> int:
        return expert_grid_side(self.num_experts)

    def to_dict(self) -> dict:
        return {"model_type": "omnimoe_layer", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> "OmniMoEConfig":
        return cls(**dataclass_kwargs(cls, data))
