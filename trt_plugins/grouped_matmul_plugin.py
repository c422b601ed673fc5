"""TensorRT IPluginV3 for `omnimoe::OmniExpertGroupedMatMul` (SPEC §3), backed by the Triton kernel.

    inputs : x [T, d], up [N, d], down [N, d]  (float32 | float16 | bfloat16, all the same type),
             gates [T, K] float32, indices [T, K] int32
    fields : activation (CHAR: "silu" | "gelu" | "relu" | "gelu_tanh")
    outputs: y [T, d], type of x

Build time: y's type and shape follow x; workspace = the kernel's `expert_workspace_bytes` at the
profile's maximum T (the expert-centric schedule's buffers). Run time: `enqueue` wraps TensorRT's
pointers as torch tensors (zero copies) and calls `expert_grouped_matmul_triton` with `out=` and
the workspace on TensorRT's stream: no allocation, no host sync, CUDA-graph capturable.
"""
from __future__ import annotations

from export.schemas import EXPERT_GROUPED_MATMUL
from omnimoe.errors import OmniMoEInputError

from . import _base, _tensors

OP = EXPERT_GROUPED_MATMUL
_CLASSES: dict[str, tuple[type, type]] = {}


def workspace_bytes(max_tokens: int, top_k: int, num_experts: int, hidden_size: int) -> int:
    from omnimoe.kernels import expert_workspace_bytes

    return int(expert_workspace_bytes(int(max_tokens), int(top_k), int(num_experts), int(hidden_size)))


def plugin_classes(trt) -> tuple[type, type]:
    """(plugin class, creator class) for TensorRT module `trt` (built once per module)."""
    key = trt.__name__
    if key in _CLASSES:
        return _CLASSES[key]
    Base = _base.make_base_class(trt, OP)
    float_types = [getattr(trt.DataType, n) for n in _tensors.FLOAT_TYPE_NAMES if hasattr(trt.DataType, n)]

    class ExpertGroupedMatMulPlugin(Base):
        def __init__(self, attrs: dict, phase=None):
            super().__init__(attrs, phase)
            self.activation = str(self.attrs["activation"])

        # -- build --------------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            return [input_types[0]]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            if len(inputs) != 5 or any(len(inputs[i]) != 2 for i in range(5)):
                raise OmniMoEInputError(
                    f"{OP.op_type}: expects x [T,d], up [N,d], down [N,d], gates [T,K], indices [T,K]"
                )
            d_x, d_up = _base.constant_dim(inputs[0][1]), _base.constant_dim(inputs[1][1])
            if d_x is not None and d_up is not None and d_x != d_up:
                raise OmniMoEInputError(f"{OP.op_type}: x has d={d_x} but the expert tables have d={d_up}")
            return [trt.DimsExprs(inputs[0])]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 0:  # x
                return desc.type in float_types
            if pos in (1, 2, 5):  # up, down, y: the type of x
                return desc.type == in_out[0].desc.type
            if pos == 3:  # gates
                return desc.type == trt.DataType.FLOAT
            return desc.type == trt.DataType.INT32  # indices

        def get_workspace_size(self, inputs, outputs):
            max_tokens, hidden = inputs[0].max[0], inputs[0].max[1]
            num_experts = inputs[1].max[0]
            top_k = inputs[3].max[1]
            return workspace_bytes(max_tokens, top_k, num_experts, hidden)

        # -- runtime ------------------------------------------------------------------------
        def on_shape_change(self, inputs, outputs):
            from omnimoe import kernels  # noqa: F401  (import outside enqueue)

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            from omnimoe.kernels import expert_grouped_matmul_triton

            T, d = _tensors.dims_tuple(input_desc[0].dims)
            if T == 0:
                return
            x = _tensors.as_torch(input_desc[0], inputs[0])
            up = _tensors.as_torch(input_desc[1], inputs[1])
            down = _tensors.as_torch(input_desc[2], inputs[2])
            gates = _tensors.as_torch(input_desc[3], inputs[3])
            indices = _tensors.as_torch(input_desc[4], inputs[4])
            y = _tensors.as_torch(output_desc[0], outputs[0])
            N, K = up.shape[0], gates.shape[1]
            scratch = _tensors.workspace_tensor(workspace, workspace_bytes(T, K, N, d))
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                expert_grouped_matmul_triton(x, up, down, gates, indices, self.activation, out=y, workspace=scratch)

    ExpertGroupedMatMulPlugin.__name__ = "ExpertGroupedMatMulPlugin"
    Creator = _base.make_creator_class(trt, OP, ExpertGroupedMatMulPlugin)
    _CLASSES[key] = (ExpertGroupedMatMulPlugin, Creator)
    return _CLASSES[key]
