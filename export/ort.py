"""ONNX Runtime sessions for both exported graphs (standard twin and plugin graph).

`ort_session(path)` returns an `onnxruntime.InferenceSession`. The standard-op twin needs
nothing special and runs on any execution provider. For a plugin graph (nodes in domain
`omnimoe`) the two SPEC §3 ops are registered as onnxruntime-extensions Python custom ops that
call the reference implementations in `omnimoe.ops`; they run on the CPU.

fp16 / bf16 plugin graphs: onnxruntime-extensions Python ops are registered with one fixed type
signature per op type, and numpy has no bfloat16, so the ops are registered for float32 only
(the signature SPEC §3 fixes for `OmniProductKeyTopK`, whose inputs are the fp32 router
log-probs anyway). When a graph's `OmniExpertGroupedMatMul` takes fp16/bf16 tensors, the session
is built from an in-memory copy of the graph in which that node's `x`, `up` and `down` pass
through `Cast(to=float)` and its output through `Cast(to=<original dtype>)`. This computes
exactly what the op contract says (fp16/bf16 operands, fp32 accumulation, result in x's dtype),
at the cost of ONNX Runtime holding float32 copies of the expert tables; the file on disk is
not changed. External data still loads from the model's own directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from omnimoe.errors import OmniMoEInputError

from . import schemas

_REGISTERED = False


def _register_custom_ops() -> None:
    """Register the two ops with onnxruntime-extensions once per process."""
    global _REGISTERED
    if _REGISTERED:
        return
    import torch
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from omnimoe import ops as omni_ops

    dt = {
        "tensor(float)": PyCustomOpDef.dt_float,
        "tensor(int32)": PyCustomOpDef.dt_int32,
        "T": PyCustomOpDef.dt_float,  # see the module docstring for fp16/bf16
    }
    attr_dt = {"int": PyCustomOpDef.dt_int64, "string": PyCustomOpDef.dt_string}

    def signature(decl: schemas.OpDecl) -> dict:
        return {
            "op_type": f"{schemas.DOMAIN}::{decl.op_type}",
            "inputs": [dt[t] for _, t in decl.inputs],
            "outputs": [dt[t] for _, t in decl.outputs],
            "attrs": {a.name: attr_dt[a.kind] for a in decl.attributes},
        }

    @onnx_op(**signature(schemas.PRODUCT_KEY_TOPK))
    def _product_key_topk(log_probs_x, log_probs_y, **attrs):
        gates, indices = omni_ops.product_key_topk_reference(
            torch.from_numpy(np.ascontiguousarray(log_probs_x)),
            torch.from_numpy(np.ascontiguousarray(log_probs_y)),
            int(attrs["top_k"]),
            str(attrs["gate"]),
        )
        return gates.numpy(), indices.numpy()

    @onnx_op(**signature(schemas.EXPERT_GROUPED_MATMUL))
    def _expert_grouped_matmul(x, up, down, gates, indices, **attrs):
        as_torch = [torch.from_numpy(np.ascontiguousarray(a)) for a in (x, up, down, gates, indices)]
        return omni_ops.expert_grouped_matmul_reference(*as_torch, str(attrs["activation"])).numpy()

    _REGISTERED = True


def _is_plugin_graph(model) -> bool:
    return any(n.domain == schemas.DOMAIN for n in model.graph.node)


def _cast_plugin_operands_to_float(model) -> bool:
    """Wrap each non-fp32 OmniExpertGroupedMatMul in Casts (in place); True if anything changed."""
    from onnx import TensorProto, helper

    value_types = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        value_types[vi.name] = vi.type.tensor_type.elem_type
    for init in model.graph.initializer:
        value_types[init.name] = init.data_type
    changed = False
    new_nodes = []
    for node in model.graph.node:
        if node.domain == schemas.DOMAIN and node.op_type == schemas.EXPERT_GROUPED_MATMUL.op_type:
            x_type = value_types.get(node.input[0], TensorProto.FLOAT)
            if x_type != TensorProto.FLOAT:
                changed = True
                for pos in range(3):  # x, up, down share the type T
                    cast_name = f"{node.input[pos]}__as_float"
                    new_nodes.append(helper.make_node("Cast", [node.input[pos]], [cast_name], to=TensorProto.FLOAT))
                    node.input[pos] = cast_name
                y_name = node.output[0]
                node.output[0] = f"{y_name}__float"
                new_nodes.append(node)
                new_nodes.append(helper.make_node("Cast", [node.output[0]], [y_name], to=x_type))
                continue
        new_nodes.append(node)
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        # The stored intermediate types no longer hold for the rewired values; let ORT infer them.
        del model.graph.value_info[:]
    return changed


def ort_session(path: str | os.PathLike, providers: list | None = None, session_options=None):
    """An onnxruntime.InferenceSession for an exported model, standard or plugin graph.

    providers: passed to ONNX Runtime (default: CPUExecutionProvider). Plugin graphs always
    get the onnxruntime-extensions library registered; their custom nodes run on the CPU.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OmniMoEInputError(f"{path}: no such ONNX model")
    options = session_options or ort.SessionOptions()
    providers = providers or ["CPUExecutionProvider"]
    # Graph structure only; external data (large tables) stays on disk for ORT to map.
    model = onnx.load(str(path), load_external_data=False)
    if not _is_plugin_graph(model):
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)

    from onnxruntime_extensions import get_library_path

    _register_custom_ops()
    options.register_custom_ops_library(get_library_path())
    if not _cast_plugin_operands_to_float(model):
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    # Session from the rewritten bytes; external data resolves relative to the original file.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(path.resolve().parent)
    )
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
