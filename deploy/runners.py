"""Polygraphy runners for the places an OmniMoE model runs: PyTorch, ONNX Runtime, TensorRT.

Every runner yields the model output under the ONNX output name (`y` for a layer, `logits` for
TinyOmniLM). The PyTorch runner also yields, per OmniMoE layer l (module order), the reference
routing: `routing.l.log_probs_x`, `routing.l.log_probs_y` [T, s] and `routing.l.indices` [T, K].
ONNX Runtime on a plugin graph yields `routing.l.indices` from the OmniProductKeyTopK nodes.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from omnimoe import ops
from omnimoe.errors import OmniMoEInputError
from omnimoe.layer import OmniMoELayer
from omnimoe.models import TinyOmniLM

ROUTING_PREFIX = "routing."


def model_io(model) -> tuple[str, str]:
    """(input name, output name) as the exporter names them."""
    if isinstance(model, OmniMoELayer):
        return "x", "y"
    if isinstance(model, TinyOmniLM):
        return "input_ids", "logits"
    raise OmniMoEInputError(f"not an OmniMoE checkpoint: {type(model).__name__}")


def omnimoe_layers(model) -> list[OmniMoELayer]:
    return [m for m in model.modules() if isinstance(m, OmniMoELayer)]


def to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@contextlib.contextmanager
def capture_routing(model):
    """Record each OmniMoE layer's reference routing during a forward pass."""
    records: "OrderedDict[str, np.ndarray]" = OrderedDict()
    handles = []
    for index, layer in enumerate(omnimoe_layers(model)):

        def hook(module, args, index=index):
            x2 = args[0].reshape(-1, module.config.hidden_size)
            px, py = module.router_log_probs(x2)
            _, idx = ops.product_key_topk_scores(px, py, module.config.top_k)
            records[f"{ROUTING_PREFIX}{index}.log_probs_x"] = to_numpy(px)
            records[f"{ROUTING_PREFIX}{index}.log_probs_y"] = to_numpy(py)
            records[f"{ROUTING_PREFIX}{index}.indices"] = idx.to(torch.int32).numpy()

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


class TorchRunner(BaseRunner):
    """The PyTorch reference (or Triton backend) as a polygraphy runner."""

    def __init__(self, model, name: str = "torch"):
        super().__init__(name=name, prefix="torch-runner")
        self.model = model.eval()
        self.input_name, self.output_name = model_io(model)

    def activate_impl(self):
        pass

    def deactivate_impl(self):
        pass

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        if isinstance(self.model, TinyOmniLM):
            meta.add(self.input_name, dtype=np.int64, shape=("batch", "seq"))
        else:
            # bf16 has no numpy dtype: bf16 models take float32 input and cast it.
            np_dtype = np.float16 if self.model.up_embed.weight.dtype == torch.float16 else np.float32
            meta.add(self.input_name, dtype=np_dtype, shape=("batch", "seq", self.model.config.hidden_size))
        return meta

    def infer_impl(self, feed_dict):
        x = torch.from_numpy(np.ascontiguousarray(feed_dict[self.input_name]))
        if x.is_floating_point():
            x = x.to(self.model.up_embed.weight.dtype if isinstance(self.model, OmniMoELayer) else x.dtype)
        start = time.perf_counter()
        with torch.no_grad(), capture_routing(self.model) as routing:
            y = self.model(x)
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(self.output_name, to_numpy(y)), *routing.items()])


def is_plugin_graph(onnx_model) -> bool:
    from export import schemas

    return any(n.domain == schemas.DOMAIN for n in onnx_model.graph.node)


@contextlib.contextmanager
def with_routing_outputs(path: Path):
    """A copy of a plugin-graph ONNX file whose OmniProductKeyTopK indices are also graph outputs.

    Written next to the original (external data is referenced relatively) and removed afterwards.
    """
    import onnx
    from onnx import helper

    from export import schemas

    model = onnx.load(str(path), load_external_data=False)
    topk_nodes = [n for n in model.graph.node if n.op_type == schemas.PRODUCT_KEY_TOPK.op_type]
    if not topk_nodes:
        yield path
        return
    for index, node in enumerate(topk_nodes):
        name = f"{ROUTING_PREFIX}{index}.indices"
        model.graph.node.append(helper.make_node("Identity", [node.output[1]], [name]))
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT32, None))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.routing.", suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        onnx.save(model, tmp)
        yield Path(tmp)
    finally:
        os.unlink(tmp)


def onnxrt_runner(path: Path, name: str, providers=None):
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from export.ort import ort_session

    return OnnxrtRunner(lambda: ort_session(path, providers=providers), name=name)


def trt_runner(engine_path: Path, name: str = "trt"):
    """polygraphy's TrtRunner on a serialized engine, with our plugins registered.

    Needs a TensorRT runtime that can execute engines on this GPU (TensorRT >= 10 on a datacenter
    GPU or Jetson). TensorRT-RTX cannot execute on sm_90 and there is no GPU in CI.
    """
    try:
        import tensorrt  # noqa: F401  (polygraphy's TrtRunner needs full TensorRT)
    except ImportError:
        raise OmniMoEInputError(
            "the trt runner needs the `tensorrt` package and a GPU it supports; engine execution is not available on this machine"
        ) from None
    if not torch.cuda.is_available():
        raise OmniMoEInputError("the trt runner needs a CUDA GPU; none is visible")
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.backend.common import BytesFromPath

    import trt_plugins

    trt_plugins.register()
    if not Path(engine_path).is_file():
        raise OmniMoEInputError(f"{engine_path}: no such engine file")
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=name)
