"""ONNX translations of the two OmniMoE custom ops, for `torch.onnx.export(dynamo=True)`.

Two tables map `torch.ops.omnimoe.*` to onnxscript functions (trace-only: plain Python that
emits ONNX nodes when the exporter calls it):

- `PLUGIN_TRANSLATIONS`: exactly one node per op, the SPEC §3 custom ops in domain `omnimoe`
  (names, attributes and output counts read from `export.schemas`), each also carrying
  `plugin_namespace="omnimoe"` for TensorRT's parser. TensorRT plugins and the
  onnxruntime-extensions ops implement them.
- `STANDARD_TRANSLATIONS`: the standard-op twin, only default-domain ONNX ops (TopK, Gather,
  GatherElements, MatMul, ...) that compute the same outputs, so any runtime runs the model.

The standard twin reproduces `omnimoe.ops.product_key_topk_reference` step by step, including
its tie rule: ONNX TopK (sorted) puts the lower index first on equal values, and the candidate
sums are put in expert order before the final TopK, so ties go to the smaller expert id.
"""
from __future__ import annotations

import math

import onnxscript
from onnxscript import ir
from onnxscript import opset18 as op

from . import schemas

_omnimoe = onnxscript.values.Opset(schemas.DOMAIN, schemas.OPSET_VERSION)


# --- plugin graph: the SPEC §3 custom nodes ----------------------------------------------------


def product_key_topk_plugin(log_probs_x, log_probs_y, top_k: int, gate: str):
    decl = schemas.PRODUCT_KEY_TOPK
    gates, indices = getattr(_omnimoe, decl.op_type)(
        log_probs_x, log_probs_y, **schemas.node_attributes(decl, top_k=int(top_k), gate=str(gate)), _outputs=len(decl.outputs)
    )
    return gates, indices


def expert_grouped_matmul_plugin(x, up, down, gates, indices, activation: str):
    decl = schemas.EXPERT_GROUPED_MATMUL
    return getattr(_omnimoe, decl.op_type)(x, up, down, gates, indices, **schemas.node_attributes(decl, activation=str(activation)))


# --- standard-op twin ---------------------------------------------------------------------------


def _static_dim(value, axis: int) -> int:
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise ValueError(f"the expert grid side must be static, got shape {value.shape}")
    return dim


def product_key_topk_standard(log_probs_x, log_probs_y, top_k: int, gate: str):
    """Exact product-key top-K from standard ops (same algorithm as the reference)."""
    s = _static_dim(log_probs_x, 1)
    k_axis = min(int(top_k), s)
    k_axis_t = op.Constant(value_ints=[k_axis])
    # Top-min(K, s) of each axis (descending; lower index first on ties).
    vx, ix = op.TopK(log_probs_x, k_axis_t, axis=-1, largest=1, sorted=1)
    vy, iy = op.TopK(log_probs_y, k_axis_t, axis=-1, largest=1, sorted=1)
    # [T, k, k] -> [T, k*k] with the width spelled out: a -1 cannot be inferred when T = 0.
    flat = op.Constant(value_ints=[0, k_axis * k_axis])
    cand_scores = op.Reshape(op.Add(op.Unsqueeze(vx, [2]), op.Unsqueeze(vy, [1])), flat)
    cand_experts = op.Reshape(
        op.Add(op.Mul(op.Unsqueeze(ix, [2]), op.Constant(value_int=s)), op.Unsqueeze(iy, [1])), flat
    )
    # Put the candidates in expert order (ascending id; ids < 2^24 are exact in float32) so the
    # final TopK's lower-position-first rule breaks score ties by smaller expert id.
    _, by_expert = op.TopK(
        op.Cast(cand_experts, to=ir.DataType.FLOAT), op.Constant(value_ints=[k_axis * k_axis]), axis=-1, largest=0, sorted=1
    )
    cand_scores = op.GatherElements(cand_scores, by_expert, axis=1)
    cand_experts = op.GatherElements(cand_experts, by_expert, axis=1)
    scores, best = op.TopK(cand_scores, op.Constant(value_ints=[int(top_k)]), axis=-1, largest=1, sorted=1)
    indices = op.Cast(op.GatherElements(cand_experts, best, axis=1), to=ir.DataType.INT32)
    if gate == "product":
        gates = op.Exp(scores)
    elif gate == "softmax":
        gates = op.Softmax(scores, axis=-1)
    else:
        raise ValueError(f"unknown gate {gate!r}")
    return gates, indices


def _activation_standard(h, name: str):
    if name == "silu":
        return op.Mul(h, op.Sigmoid(h))
    if name == "relu":
        return op.Relu(h)
    half = op.Constant(value_float=0.5)
    one = op.Constant(value_float=1.0)
    if name == "gelu":  # exact (erf) GELU, as torch.nn.functional.gelu
        inner = op.Erf(op.Mul(h, op.Constant(value_float=1.0 / math.sqrt(2.0))))
    elif name == "gelu_tanh":
        cubic = op.Mul(op.Mul(op.Mul(h, h), h), op.Constant(value_float=0.044715))
        inner = op.Tanh(op.Mul(op.Add(h, cubic), op.Constant(value_float=math.sqrt(2.0 / math.pi))))
    else:
        raise ValueError(f"unknown activation {name!r}")
    return op.Mul(op.Mul(h, half), op.Add(one, inner))


def expert_grouped_matmul_standard(x, up, down, gates, indices, activation: str):
    """y[t] = sum_k act(<up[idx], x_t>) * g * down[idx]: Gather + two batched MatMuls, in float32."""
    x_dtype = x.dtype
    up_rows = op.Gather(up, indices, axis=0)  # [T, K, d]
    down_rows = op.Gather(down, indices, axis=0)  # [T, K, d]
    x32 = x
    if x_dtype != ir.DataType.FLOAT:
        # fp32 accumulation, like the reference and the kernels.
        up_rows = op.Cast(up_rows, to=ir.DataType.FLOAT)
        down_rows = op.Cast(down_rows, to=ir.DataType.FLOAT)
        x32 = op.Cast(x, to=ir.DataType.FLOAT)
    h = op.Squeeze(op.MatMul(up_rows, op.Unsqueeze(x32, [2])), [2])  # [T, K]
    h = op.Mul(_activation_standard(h, activation), gates)
    y = op.Squeeze(op.MatMul(op.Unsqueeze(h, [1]), down_rows), [1])  # [T, d]
    if x_dtype != ir.DataType.FLOAT:
        y = op.Cast(y, to=x_dtype)
    return y


def translation_table(ops: str) -> dict:
    """{torch op overload: onnxscript function} for `--ops plugin` or `--ops standard`."""
    import torch

    from omnimoe import custom_ops  # noqa: F401  (registers torch.ops.omnimoe.*)

    if ops == "plugin":
        schemas.register_onnx_schemas()  # onnxscript refuses ops without a registered schema
        topk, experts = product_key_topk_plugin, expert_grouped_matmul_plugin
    elif ops == "standard":
        topk, experts = product_key_topk_standard, expert_grouped_matmul_standard
    else:
        raise ValueError(f"ops must be 'plugin' or 'standard', got {ops!r}")
    return {
        torch.ops.omnimoe.product_key_topk.default: topk,
        torch.ops.omnimoe.expert_grouped_matmul.default: experts,
    }
