"""ONNX Runtime sessions for both exported graphs (standard twin and plugin graph).

`ort_session(path)` returns an `onnxruntime.InferenceSession`. The standard-op twin needs
nothing special and runs on any execution provider. For a plugin graph (nodes in domain
`omnimoe`) the two SPEC §3 ops are registered as onnxruntime-extensions Python custom ops that
call the reference implementations in `omnimoe.ops`; they run on the CPU.

How plugin graphs run, fp16 / bf16 included: the onnxruntime-extensions Python custom-op API
handles float32 only (declaring a float16 input aborts the process with "Type float16 not
supported by python customops api", and numpy has no bfloat16), and it copies every input into
numpy on every call. Both ops are therefore registered for float32 (what SPEC §3 fixes for
`OmniProductKeyTopK` anyway: fp32 router log-probs), and the session is built from an in-memory
rewrite of the graph in which each `OmniExpertGroupedMatMul` receives only the rows it reads:
they are gathered from the tables in the tables' own dtype, cast to float32 when that is
fp16/bf16, and passed as a compact [T*K, d] table with indices arange(T*K); `x` is cast to
float32 and the result back to x's dtype. That is exactly the op contract (fp16/bf16 operands,
fp32 accumulation, result in x's dtype) with memory and copy cost proportional to T*K*d, never a
float32 copy of the tables. The file on disk is not changed; external data still loads from the
model's own directory. (bf16 graphs additionally need an execution provider with bf16
Gemm/MatMul kernels; ONNX Runtime's CPU provider has none.)
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


def _compact_expert_operands(model) -> bool:
    """Rewrite each OmniExpertGroupedMatMul so the Python op sees only the rows it reads (in place).

    onnxruntime-extensions copies every input of a Python op into numpy on every call, so handing
    it [N, d] tables costs a full copy of both tables per run (0.7 s per call for 2 x 1 GiB), and
    it takes float32 only. Instead, the rows the node reads are gathered in the tables' own
    dtype (cast to float32 if they are fp16/bf16) and passed as a compact table [T*K, d] with
    indices arange(T*K).reshape(T, K); y is cast back to the original dtype. The op then
    computes exactly what it would on the full tables. Returns True if any node was rewritten.
    """
    from onnx import TensorProto, helper

    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(model.graph.input) + list(model.graph.value_info)}
    types.update({init.name: init.data_type for init in model.graph.initializer})
    new_nodes = []
    changed = 0
    for node in model.graph.node:
        if not (node.domain == schemas.DOMAIN and node.op_type == schemas.EXPERT_GROUPED_MATMUL.op_type):
            new_nodes.append(node)
            continue
        table_type = types.get(node.input[1], TensorProto.FLOAT)
        is_float = table_type == TensorProto.FLOAT
        p = f"omnimoe_ort{changed}_"
        changed += 1
        x, up, down, gates, indices = node.input
        add = new_nodes.append

        def const(name, values):
            add(helper.make_node("Constant", [], [p + name], value=helper.make_tensor(p + name, TensorProto.INT64, [len(values)], values)))
            return p + name

        # compact indices: arange(T*K).reshape(T, K) as int32
        add(helper.make_node("Shape", [indices], [p + "idx_shape"]))
        add(helper.make_node("ReduceProd", [p + "idx_shape"], [p + "count1"], keepdims=1))
        add(helper.make_node("Squeeze", [p + "count1"], [p + "count"]))
        add(helper.make_node("Constant", [], [p + "zero"], value=helper.make_tensor(p + "zero", TensorProto.INT64, [], [0])))
        add(helper.make_node("Constant", [], [p + "one"], value=helper.make_tensor(p + "one", TensorProto.INT64, [], [1])))
        add(helper.make_node("Range", [p + "zero", p + "count", p + "one"], [p + "arange"]))
        add(helper.make_node("Reshape", [p + "arange", p + "idx_shape"], [p + "arange_tk"]))
        add(helper.make_node("Cast", [p + "arange_tk"], [p + "compact_idx"], to=TensorProto.INT32))
        # gathered rows [T*K, d] in float32
        minus_one = const("minus_one", [-1])
        add(helper.make_node("Shape", [up], [p + "table_d"], start=1, end=2))
        add(helper.make_node("Concat", [minus_one, p + "table_d"], [p + "rows_shape"], axis=0))
        compact = []
        for table in (up, down):
            rows = f"{p}{len(compact)}_rows"
            add(helper.make_node("Gather", [table, indices], [rows + "_tkd"], axis=0))
            if is_float:
                add(helper.make_node("Reshape", [rows + "_tkd", p + "rows_shape"], [rows]))
            else:
                add(helper.make_node("Reshape", [rows + "_tkd", p + "rows_shape"], [rows + "_flat"]))
                add(helper.make_node("Cast", [rows + "_flat"], [rows], to=TensorProto.FLOAT))
            compact.append(rows)
        x_float = x if is_float else p + "x"
        if not is_float:
            add(helper.make_node("Cast", [x], [x_float], to=TensorProto.FLOAT))
        del node.input[:]
        node.input.extend([x_float, compact[0], compact[1], gates, p + "compact_idx"])
        if is_float:
            add(node)
            continue
        y = node.output[0]
        node.output[0] = p + "y"
        add(node)
        add(helper.make_node("Cast", [p + "y"], [y], to=table_type))
    if changed:
        del model.graph.node[:]
        model.graph.node.extend(new_nodes)
        # Stored intermediate types no longer hold for the rewired values; ORT infers them.
        del model.graph.value_info[:]
    return bool(changed)


# Names of the OmniProductKeyTopK indices exposed as extra outputs (`routing_outputs=True`).
ROUTING_PREFIX = "routing."

# `--providers` short names -> ONNX Runtime execution providers.
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


def resolve_providers(text: str | None) -> list[str]:
    """`cuda,tensorrt,cpu` (or ONNX Runtime's own names) -> execution providers, in priority
    order; default CPU. Refuses, in one line, providers the installed onnxruntime lacks."""
    import onnxruntime as ort

    if not text:
        return [PROVIDERS["cpu"]]
    names = [p.strip() for p in text.split(",") if p.strip()]
    if not names:
        raise OmniMoEInputError("--providers: give at least one of " + ", ".join(PROVIDERS))
    available = ort.get_available_providers()
    providers = []
    for name in names:
        provider = PROVIDERS.get(name.lower(), name)
        if provider not in ort.get_all_providers():
            raise OmniMoEInputError(f"--providers: unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
        if provider not in available:
            hint = "; install onnxruntime-gpu" if provider in (PROVIDERS["cuda"], PROVIDERS["tensorrt"]) else ""
            raise OmniMoEInputError(
                f"--providers: the installed onnxruntime {ort.__version__} has no {provider} "
                f"(available: {', '.join(available)}){hint}"
            )
        if provider not in providers:
            providers.append(provider)
    return providers


def _add_routing_outputs(model) -> bool:
    """Expose each OmniProductKeyTopK's indices as graph output `routing.<i>.indices` (in place)."""
    from onnx import TensorProto, helper

    topk_nodes = [n for n in model.graph.node if n.domain == schemas.DOMAIN and n.op_type == schemas.PRODUCT_KEY_TOPK.op_type]
    for index, node in enumerate(topk_nodes):
        name = f"{ROUTING_PREFIX}{index}.indices"
        model.graph.node.append(helper.make_node("Identity", [node.output[1]], [name]))
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.INT32, None))
    return bool(topk_nodes)


def ort_session(path: str | os.PathLike, providers: list | None = None, session_options=None, routing_outputs: bool = False):
    """An onnxruntime.InferenceSession for an exported model, standard or plugin graph.

    providers: passed to ONNX Runtime (default: CPUExecutionProvider). Plugin graphs always
    get the onnxruntime-extensions library registered; their custom nodes run on the CPU.
    routing_outputs: also output each OmniProductKeyTopK's indices as `routing.<i>.indices`
    (plugin graphs). Graph rewrites happen in memory: nothing is written next to the model.
    """
    import onnx
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise OmniMoEInputError(f"{path}: no such ONNX model")
    options = session_options or ort.SessionOptions()
    # fp32 means fp32: the CUDA provider would otherwise run fp32 MatMuls in TF32 (its use_tf32
    # default), ~1e-3 off the reference, which parity at fp32 tolerances rightly fails.
    providers = [("CUDAExecutionProvider", {"use_tf32": "0"}) if p == "CUDAExecutionProvider" else p
                 for p in providers or ["CPUExecutionProvider"]]
    # Graph structure only; external data (large tables) stays on disk for ORT to map.
    model = onnx.load(str(path), load_external_data=False)
    rewritten = False
    if _is_plugin_graph(model):
        from onnxruntime_extensions import get_library_path

        _register_custom_ops()
        options.register_custom_ops_library(get_library_path())
        rewritten = _compact_expert_operands(model)
    if routing_outputs:
        rewritten = _add_routing_outputs(model) or rewritten
    if not rewritten:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    # Session from the rewritten bytes; external data resolves relative to the original file.
    options.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(path.resolve().parent)
    )
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
