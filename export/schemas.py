"""The two custom ONNX ops of SPEC §3, declared once.

The exporter, the ONNX Runtime ops and the TensorRT plugins all read these declarations: op
names, domain, version, input/output names and attribute names/types come from here only.
"""
from __future__ import annotations

import dataclasses

import onnx
from onnx import defs

DOMAIN = "omnimoe"
OPSET_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Attribute:
    name: str
    kind: str  # "int" | "string"
    allowed: tuple = ()


@dataclasses.dataclass(frozen=True)
class OpDecl:
    op_type: str
    inputs: tuple[tuple[str, str], ...]  # (name, type constraint)
    outputs: tuple[tuple[str, str], ...]
    attributes: tuple[Attribute, ...]
    type_constraints: tuple[tuple[str, tuple[str, ...]], ...]
    doc: str

    @property
    def input_names(self) -> list[str]:
        return [n for n, _ in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.outputs]

    @property
    def attribute_names(self) -> list[str]:
        return [a.name for a in self.attributes]


PRODUCT_KEY_TOPK = OpDecl(
    op_type="OmniProductKeyTopK",
    inputs=(("log_probs_x", "tensor(float)"), ("log_probs_y", "tensor(float)")),
    outputs=(("gates", "tensor(float)"), ("indices", "tensor(int32)")),
    attributes=(Attribute("top_k", "int"), Attribute("gate", "string", ("product", "softmax"))),
    type_constraints=(),
    doc="Exact top-K of S[t, i*s+j] = log_probs_x[t,i] + log_probs_y[t,j]; gates = exp(S) (product) "
    "or softmax over the K (softmax); indices = i*s+j, descending score, smaller index on ties.",
)

EXPERT_GROUPED_MATMUL = OpDecl(
    op_type="OmniExpertGroupedMatMul",
    inputs=(("x", "T"), ("up", "T"), ("down", "T"), ("gates", "tensor(float)"), ("indices", "tensor(int32)")),
    outputs=(("y", "T"),),
    attributes=(Attribute("activation", "string", ("silu", "gelu", "relu", "gelu_tanh")),),
    type_constraints=(("T", ("tensor(float)", "tensor(float16)", "tensor(bfloat16)")),),
    doc="y[t] = sum_k act(<up[indices[t,k]], x[t]>) * gates[t,k] * down[indices[t,k]] (fp32 accumulation).",
)

OPS = (PRODUCT_KEY_TOPK, EXPERT_GROUPED_MATMUL)

# Attributes every exported custom node carries besides its op's own. They identify the plugin to
# TensorRT's ONNX parser (TensorRT 10.3 on JetPack 6 looks plugins up by `plugin_namespace`), and
# are NOT op parameters: they never reach the plugins' field lists, which are `OpDecl.attributes`.
NODE_ONLY_ATTRIBUTES = (Attribute("plugin_namespace", "string", (DOMAIN,)),)


def node_attributes(op: OpDecl, **values) -> dict:
    """The attributes of an exported `op` node: the op's own (`values`, exactly the declared
    names) plus NODE_ONLY_ATTRIBUTES at their one allowed value."""
    if set(values) != set(op.attribute_names):
        raise ValueError(f"{op.op_type} takes attributes {op.attribute_names}, got {sorted(values)}")
    return {**values, **{a.name: a.allowed[0] for a in NODE_ONLY_ATTRIBUTES}}


def _to_onnx_schema(op: OpDecl) -> defs.OpSchema:
    attr_type = {"int": defs.OpSchema.AttrType.INT, "string": defs.OpSchema.AttrType.STRING}
    return defs.OpSchema(
        op.op_type,
        DOMAIN,
        OPSET_VERSION,
        doc=op.doc,
        inputs=[defs.OpSchema.FormalParameter(n, t) for n, t in op.inputs],
        outputs=[defs.OpSchema.FormalParameter(n, t) for n, t in op.outputs],
        type_constraints=[(name, list(types), "") for name, types in op.type_constraints],
        attributes=[defs.OpSchema.Attribute(a.name, attr_type[a.kind], "", required=True) for a in op.attributes]
        + [defs.OpSchema.Attribute(a.name, attr_type[a.kind], "", required=False) for a in NODE_ONLY_ATTRIBUTES],
    )


def register_onnx_schemas() -> None:
    """Register both op schemas with onnx (idempotent); onnxscript and the checker need them."""
    for op in OPS:
        try:
            defs.get_schema(op.op_type, OPSET_VERSION, DOMAIN)
        except defs.SchemaError:
            defs.register_schema(_to_onnx_schema(op))


def op_by_type(op_type: str) -> OpDecl:
    for op in OPS:
        if op.op_type == op_type:
            return op
    raise KeyError(op_type)


_IR_ATTR_KINDS = {"int": "INT", "string": "STRING"}


def check_ir_node(node) -> None:
    """Raise ValueError unless an onnx_ir node in DOMAIN matches its declaration exactly
    (known op type, version, input/output counts, every declared attribute with its type and
    allowed value, the NODE_ONLY_ATTRIBUTES, and no other attribute)."""
    if node.domain != DOMAIN:
        raise ValueError(f"{node.op_type}: domain {node.domain!r}, expected {DOMAIN!r}")
    try:
        decl = op_by_type(node.op_type)
    except KeyError:
        raise ValueError(f"unknown op {DOMAIN}::{node.op_type}") from None
    if len(node.inputs) != len(decl.inputs) or len(node.outputs) != len(decl.outputs):
        raise ValueError(
            f"{decl.op_type}: {len(node.inputs)} inputs / {len(node.outputs)} outputs, "
            f"expected {len(decl.inputs)} / {len(decl.outputs)}"
        )
    expected = decl.attribute_names + [a.name for a in NODE_ONLY_ATTRIBUTES]
    if set(node.attributes) != set(expected):
        raise ValueError(f"{decl.op_type}: attributes {sorted(node.attributes)}, expected {expected}")
    for attr in decl.attributes + NODE_ONLY_ATTRIBUTES:
        value = node.attributes[attr.name]
        if value.type.name != _IR_ATTR_KINDS[attr.kind]:
            raise ValueError(f"{decl.op_type}.{attr.name}: attribute type {value.type.name}, expected {attr.kind}")
        if attr.allowed and value.value not in attr.allowed:
            raise ValueError(f"{decl.op_type}.{attr.name}={value.value!r}, expected one of {attr.allowed}")
