"""Polygraphy runners for the places an OmniMoE model runs: PyTorch, ONNX Runtime, TensorRT.

Every runner yields the model output under the ONNX output name (`y` for a layer, `logits` for
TinyOmniLM). The PyTorch runner also yields, per OmniMoE layer l (module order), the reference
routing: `routing.l.log_probs_x`, `routing.l.log_probs_y` [T, s] and `routing.l.indices` [T, K].
ONNX Runtime on a plugin graph yields `routing.l.indices` from the OmniProductKeyTopK nodes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.common import TensorMetadata

from export.ort import ROUTING_PREFIX  # routing.<layer>.<what>
from omnimoe import ops
from omnimoe.errors import OmniMoEInputError
from omnimoe.layer import OmniMoELayer
from omnimoe.models import TinyOmniLM


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

    def __init__(self, model, name: str = "torch", report_routing: bool = True):
        super().__init__(name=name, prefix="torch-runner")
        self.model = model.eval()
        self.report_routing = report_routing
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
        x = x.to(self.model_device)
        start = time.perf_counter()
        capture = capture_routing(self.model) if self.report_routing else contextlib.nullcontext({})
        with torch.no_grad(), capture as routing:
            y = to_numpy(self.model(x))  # the copy to host also waits for the GPU
        self.inference_time = time.perf_counter() - start
        return OrderedDict([(self.output_name, y), *routing.items()])

    @property
    def model_device(self) -> torch.device:
        return next(self.model.parameters()).device


def is_plugin_graph(onnx_model) -> bool:
    from export import schemas

    return any(n.domain == schemas.DOMAIN for n in onnx_model.graph.node)


def onnxrt_runner(path: Path, name: str, providers=None, routing_outputs: bool = False):
    """polygraphy's OnnxrtRunner; with routing_outputs, a plugin graph also yields
    `routing.<i>.indices` (added to the graph in memory; the model's directory is not written)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from export.ort import ort_session

    return OnnxrtRunner(lambda: ort_session(path, providers=providers, routing_outputs=routing_outputs), name=name)


def trt_runner(engine_path: Path, name: str = "trt"):
    """polygraphy's TrtRunner on a serialized engine, with its plugins loaded: the native library
    the engine was built with (`omnimoe build --plugins native`), else the Python plugins.

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
    from deploy.build import engine_plugin_library, load_plugin_library

    if not Path(engine_path).is_file():
        raise OmniMoEInputError(f"{engine_path}: no such engine file")
    library = engine_plugin_library(Path(engine_path))
    if library is None:
        trt_plugins.register()
    elif not library.is_file():
        raise OmniMoEInputError(f"{engine_path} needs its plugin library {library}, which is missing")
    else:
        load_plugin_library(trt_plugins.load("tensorrt"), library)
    return TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))), name=name)


# ---------------------------------------------------------------------------------------------
# What to run: a checkpoint and/or ONNX files, the runners for them, and their input
# ---------------------------------------------------------------------------------------------
RUNNER_NAMES = ("torch", "torch-triton", "onnxrt", "onnxrt-plugin", "trt")


def parse_runner_names(text: str | None) -> list[str] | None:
    if not text:
        return None
    names = [r.strip() for r in text.split(",") if r.strip()]
    for r in names:
        if r not in RUNNER_NAMES:
            raise OmniMoEInputError(f"unknown runner {r!r}; choose from {', '.join(RUNNER_NAMES)}")
        if names.count(r) > 1:
            raise OmniMoEInputError(f"--runners names {r} more than once; each runner runs once")
    return names


@dataclasses.dataclass
class Target:
    """A checkpoint (model) and/or ONNX files, with the I/O contract they share."""

    model: torch.nn.Module | None
    input_name: str
    output_name: str
    np_dtype: type
    shape: list  # None for dynamic axes
    vocab: int | None
    max_seq_len: int | None
    dtype: str  # fp32 | fp16 | bf16
    onnx_files: dict  # runner name -> Path

    @property
    def token_ids(self) -> bool:
        return np.issubdtype(self.np_dtype, np.integer)


def _onnx_io(path: Path) -> tuple:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types on garbage
        raise OmniMoEInputError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise OmniMoEInputError(f"{path}: expected one input and one output (an omnimoe export)")
    inp, out = model.graph.input[0], model.graph.output[0]

    def dims(value):
        return [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]

    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16"}
    dtype = names.get(out.type.tensor_type.elem_type, "fp32")
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(inp.type.tensor_type.elem_type)
    # A TinyOmniLM graph holds its position table (initializers keep the module's names): its rows
    # are the longest sequence the model takes.
    pos = [list(t.dims) for t in model.graph.initializer if t.name.endswith("pos_embed.weight") and len(t.dims) == 2]
    max_seq_len = pos[0][0] if pos else None
    return inp.name, out.name, np_dtype, dims(inp), dims(out), dtype, is_plugin_graph(model), max_seq_len


def open_target(target: Path, onnx_paths=()) -> Target:
    """A checkpoint directory (optionally with ONNX files made from it) or an ONNX file."""
    model = None
    onnx_paths = list(onnx_paths)
    if target.is_dir():
        from omnimoe.checkpoint import load_checkpoint

        model = load_checkpoint(target)
        input_name, output_name = model_io(model)
        is_lm = output_name == "logits"
        # fp16 layers take fp16 input; bf16 ones (no numpy dtype) float32, cast by the torch runner.
        weights = omnimoe_layers(model)[0].up_embed.weight.dtype
        dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(weights, "fp32")
        setup = Target(
            model, input_name, output_name, np.int64 if is_lm else (np.float16 if dtype == "fp16" else np.float32),
            [None, None] if is_lm else [None, None, model.config.hidden_size],
            model.config.vocab_size if is_lm else None, model.config.max_seq_len if is_lm else None, dtype, {},
        )
    elif target.is_file() and target.suffix == ".onnx":
        onnx_paths.insert(0, target)
        setup = None
    elif target.suffix == ".onnx":
        raise OmniMoEInputError(f"{target}: no such ONNX model")
    else:
        raise OmniMoEInputError(f"{target}: no such checkpoint directory or ONNX model")
    for i, path in enumerate(onnx_paths):
        if not path.is_file():
            raise OmniMoEInputError(f"{path}: no such ONNX model")
        if any(os.path.samefile(path, earlier) for earlier in onnx_paths[:i]):
            raise OmniMoEInputError(f"{path}: given twice; each model runs once")
        input_name, output_name, np_dtype, in_dims, out_dims, dtype, plugin, max_seq_len = _onnx_io(path)
        if setup is None:
            vocab = out_dims[-1] if np.issubdtype(np_dtype, np.integer) and out_dims else None
            setup = Target(None, input_name, output_name, np_dtype, in_dims, vocab, max_seq_len, dtype, {})
        elif (input_name, output_name) != (setup.input_name, setup.output_name):
            raise OmniMoEInputError(f"{path}: its I/O ({input_name} -> {output_name}) does not match {target}")
        elif len(in_dims) != len(setup.shape) or any(a and b and a != b for a, b in zip(in_dims, setup.shape)):
            shown = lambda dims: ["*" if d is None else d for d in dims]  # noqa: E731
            raise OmniMoEInputError(f"{path}: input {input_name} {shown(in_dims)} does not match {target}'s {shown(setup.shape)}")
        else:
            setup.dtype = dtype
        if max_seq_len is not None:
            setup.max_seq_len = min(max_seq_len, setup.max_seq_len or max_seq_len)
        kind = "onnxrt-plugin" if plugin else "onnxrt"
        setup.onnx_files[kind if kind not in setup.onnx_files else f"{kind}:{path.name}"] = path
    return setup


def build_runners(setup: Target, requested, *, engine=None, stack: contextlib.ExitStack, log=print, report_routing=True,
                  providers=None) -> list:
    """Runner objects in order (the first is the reference).

    Default: for a checkpoint, torch plus the given ONNX files, or torch + both exported graphs
    when none is given; for an ONNX file, that file. A named onnxrt* runner means the given file(s)
    when there are any, else a graph exported from the checkpoint into a temporary directory.
    providers: ONNX Runtime execution providers for the onnxrt* runners (default CPU).
    """
    if requested is None:
        names = (["torch"] if setup.model is not None else []) + (
            list(setup.onnx_files) or ["onnxrt", "onnxrt-plugin"]
        )
    elif setup.onnx_files:
        names = [n for n in requested if n not in ("onnxrt", "onnxrt-plugin")] + list(setup.onnx_files)
    else:
        names = requested
    tmp = None
    runners = []
    for name in names:
        if name in ("torch", "torch-triton"):
            if setup.model is None:
                raise OmniMoEInputError(f"the {name} runner needs a checkpoint directory as target")
            model = setup.model
            if name == "torch-triton":
                if not torch.cuda.is_available():
                    raise OmniMoEInputError("the torch-triton runner needs a CUDA GPU")
                import copy

                model = copy.deepcopy(setup.model).cuda()
                for layer in omnimoe_layers(model):
                    layer.backend = "triton"
            runners.append(TorchRunner(model, name=name, report_routing=report_routing))
        elif name.startswith(("onnxrt", "onnxrt-plugin")):
            path = setup.onnx_files.get(name)
            if path is None:
                from deploy.export_cmd import example_inputs_for
                from export.onnx_export import export_onnx

                if tmp is None:
                    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="omnimoe-")))
                if setup.dtype == "bf16":
                    raise OmniMoEInputError(f"the {name} runner cannot take a bf16 checkpoint (numpy has no bfloat16); "
                                            "export it with --dtype bf16 for TensorRT, or compare --runners torch with --onnx")
                inputs, in_names, out_names, dynamic = example_inputs_for(setup.model)
                ops_kind = "plugin" if name == "onnxrt-plugin" else "standard"
                path = tmp / f"{name}.onnx"
                log(f"exporting the {ops_kind}-op graph for {name} ...")
                export_onnx(setup.model, path, example_inputs=inputs, ops=ops_kind, dtype=setup.dtype, input_names=in_names,
                            output_names=out_names, dynamic_shapes=dynamic, progress=False)
            runners.append(onnxrt_runner(path, name, providers, routing_outputs=report_routing and name.startswith("onnxrt-plugin")))
        elif name == "trt":
            if not engine:
                raise OmniMoEInputError("the trt runner needs --engine MODEL.engine")
            runners.append(trt_runner(Path(engine)))
    return runners


def load_array(path, name: str) -> np.ndarray:
    """A .npy array, or the array called `name` (or the only one) in a .npz."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        raise OmniMoEInputError(f"{path}: no such input file")
    unreadable = (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError)
    try:
        data = np.load(path, allow_pickle=False)
    except unreadable as e:
        raise OmniMoEInputError(f"{path}: not a readable .npy/.npz file ({type(e).__name__}: {e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        return data
    with data:  # every member is checked, not only the one used
        arrays = {}
        for member in data.files:
            try:
                arrays[member] = data[member]
            except unreadable as e:
                raise OmniMoEInputError(f"{path}: member {member!r} is not a readable array ({type(e).__name__}: {e})") from None
            if not isinstance(arrays[member], np.ndarray):
                raise OmniMoEInputError(f"{path}: member {member!r} is not a .npy array")
    if name in arrays:
        return arrays[name]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise OmniMoEInputError(f"{path}: holds {sorted(arrays)}; expected an array named {name!r}")


def check_input(setup: Target, x: np.ndarray) -> np.ndarray:
    """Shape, dtype and range checks; returns x in the model's input dtype."""
    name = setup.input_name
    if x.ndim != len(setup.shape) or any(s is not None and s != d for s, d in zip(setup.shape, x.shape)):
        want = ["*" if s is None else s for s in setup.shape]
        raise OmniMoEInputError(f"input {name} must have shape {want}, got {list(x.shape)}")
    if setup.token_ids != np.issubdtype(x.dtype, np.integer) or not (setup.token_ids or np.issubdtype(x.dtype, np.floating)):
        raise OmniMoEInputError(f"input {name} must be {'integer token ids' if setup.token_ids else 'floating point'}, got {x.dtype}")
    if setup.token_ids and x.size and setup.vocab and (x.min() < 0 or x.max() >= setup.vocab):
        raise OmniMoEInputError(f"token ids must lie in [0, {setup.vocab})")
    if setup.max_seq_len is not None and x.shape[1] > setup.max_seq_len:
        raise OmniMoEInputError(f"sequence length {x.shape[1]} exceeds the model's max_seq_len {setup.max_seq_len}")
    return x.astype(setup.np_dtype)


def make_input(setup: Target, input_path=None, tokens: int = 37, batch: int = 2, seed: int = 0) -> np.ndarray:
    """The given input (checked) or a seeded random one of [batch, tokens(, d)]."""
    if input_path:
        return check_input(setup, load_array(input_path, setup.input_name))
    if tokens < 0 or batch < 1:
        raise OmniMoEInputError("--tokens must be >= 0 and --batch >= 1")
    need = batch * tokens * (1 if setup.token_ids else setup.shape[-1]) * 8
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > memory:
        raise OmniMoEInputError(f"--batch {batch} x --tokens {tokens} needs {need / 2**30:,.1f} GiB for the input alone; "
                                f"this machine has {memory / 2**30:,.1f} GiB of memory")
    if setup.max_seq_len is not None and tokens > setup.max_seq_len:
        raise OmniMoEInputError(f"--tokens {tokens} exceeds the model's max_seq_len {setup.max_seq_len}")
    rng = np.random.default_rng(seed)
    if setup.token_ids:
        if not setup.vocab:
            raise OmniMoEInputError("vocabulary size unknown; pass --input")
        return check_input(setup, rng.integers(0, setup.vocab, size=(batch, tokens)))
    return check_input(setup, rng.standard_normal((batch, tokens, setup.shape[-1])))


def count_nonfinite(x: np.ndarray) -> int:
    return int((~np.isfinite(x)).sum()) if np.issubdtype(x.dtype, np.floating) else 0
