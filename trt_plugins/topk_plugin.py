"""TensorRT IPluginV3 for `omnimoe::OmniProductKeyTopK` (SPEC §3), backed by the Triton kernel.

    inputs : log_probs_x [T, s] float32, log_probs_y [T, s] float32
    fields : top_k (INT32), gate (CHAR: "product" | "softmax")
    outputs: gates [T, K] float32, indices [T, K] int32

Build time: output types/shapes from the symbolic input shapes; workspace = the kernel's
`topk_workspace_bytes` at the profile's maximum T. Run time: `enqueue` wraps TensorRT's pointers
as torch tensors (zero copies) and calls `product_key_topk_triton` with preallocated outputs and
workspace on TensorRT's stream: no allocation, no host sync, CUDA-graph capturable.
"""
from __future__ import annotations

from export.schemas import PRODUCT_KEY_TOPK
from omnimoe.errors import OmniMoEInputError

from . import _base, _tensors

OP = PRODUCT_KEY_TOPK
_CLASSES: dict[str, tuple[type, type]] = {}


def workspace_bytes(max_tokens: int, grid_side: int, top_k: int) -> int:
    from omnimoe.kernels import topk_workspace_bytes

    return int(topk_workspace_bytes(int(max_tokens), int(grid_side), int(top_k)))


def plugin_classes(trt) -> tuple[type, type]:
    """(plugin class, creator class) for TensorRT module `trt` (built once per module)."""
    key = trt.__name__
    if key in _CLASSES:
        return _CLASSES[key]
    Base = _base.make_base_class(trt, OP)

    class ProductKeyTopKPlugin(Base):
        def __init__(self, attrs: dict, phase=None):
            super().__init__(attrs, phase)
            self.top_k = int(self.attrs["top_k"])
            self.gate = str(self.attrs["gate"])
            if self.top_k < 1:
                raise OmniMoEInputError(f"{OP.op_type}: top_k must be >= 1, got {self.top_k}")

        # -- build --------------------------------------------------------------------------
        def get_output_data_types(self, input_types):
            return [trt.DataType.FLOAT, trt.DataType.INT32]

        def get_output_shapes(self, inputs, shape_inputs, expr_builder):
            if len(inputs) != 2 or len(inputs[0]) != 2 or len(inputs[1]) != 2:
                raise OmniMoEInputError(f"{OP.op_type}: expects log_probs_x and log_probs_y of rank 2 [T, s]")
            s = _base.constant_dim(inputs[0][1])
            if s is not None and self.top_k > s * s:
                raise OmniMoEInputError(f"{OP.op_type}: top_k={self.top_k} exceeds N = s*s = {s * s}")
            out = trt.DimsExprs(2)
            out[0] = inputs[0][0]
            out[1] = expr_builder.constant(self.top_k)
            return [out, trt.DimsExprs(out)]

        def supports_format_combination(self, pos, in_out, num_inputs):
            desc = in_out[pos].desc
            if desc.format != trt.TensorFormat.LINEAR:
                return False
            if pos == 3:  # indices
                return desc.type == trt.DataType.INT32
            return desc.type == trt.DataType.FLOAT  # both log-probs and gates

        def get_workspace_size(self, inputs, outputs):
            max_dims = inputs[0].max
            return workspace_bytes(max_dims[0], max_dims[1], self.top_k)

        # -- runtime ------------------------------------------------------------------------
        def on_shape_change(self, inputs, outputs):
            # Import (and so compile-on-first-use setup) outside enqueue: enqueue only launches.
            from omnimoe import kernels  # noqa: F401

        def enqueue(self, input_desc, output_desc, inputs, outputs, workspace, stream):
            import torch

            from omnimoe.kernels import product_key_topk_triton

            T, s = _tensors.dims_tuple(input_desc[0].dims)
            if T == 0:
                return
            lx = _tensors.as_torch(input_desc[0], inputs[0])
            ly = _tensors.as_torch(input_desc[1], inputs[1])
            gates = _tensors.as_torch(output_desc[0], outputs[0])
            indices = _tensors.as_torch(output_desc[1], outputs[1])
            scratch = _tensors.workspace_tensor(workspace, workspace_bytes(T, s, self.top_k))
            with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
                product_key_topk_triton(
                    lx, ly, self.top_k, self.gate, gates_out=gates, indices_out=indices, workspace=scratch
                )

    ProductKeyTopKPlugin.__name__ = "ProductKeyTopKPlugin"
    Creator = _base.make_creator_class(trt, OP, ProductKeyTopKPlugin)
    _CLASSES[key] = (ProductKeyTopKPlugin, Creator)
    return _CLASSES[key]
