"""Export any nn.Module that contains OmniMoE layers to ONNX (SPEC §3).

    export_onnx(model, "model.onnx", example_inputs=(x,), ops="plugin" | "standard",
                dtype="fp32" | "fp16" | "bf16", opset=None, input_names=["x"], output_names=["y"],
                dynamic_shapes=({0: "batch", 1: "seq"},))

How: `torch.onnx.export(dynamo=True)` traces the model; every OmniMoE layer dispatches to
`torch.ops.omnimoe.*` under tracing, and `export.translations` turns those into either the two
SPEC §3 custom nodes (`ops="plugin"`) or the standard-op twin (`ops="standard"`). The weights are
then written by this module rather than by `ONNXProgram.save`, so that

- large tensors are streamed into one external-data file in chunks straight from the model's
  own tensors (no second in-RAM copy of a table), with a progress bar;
- the .onnx file and its .onnx.data file are written in a temporary directory, checked there
  (`onnx.checker` full check by path, strict shape inference), and renamed into place together:
  either both appear or neither does.

Initializer names are the module's parameter names (`up_embed.weight`,
`layers.0.moe.up_embed.weight`, ...).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn

import omnimoe
from omnimoe.atomic import atomic_files, check_output
from omnimoe.errors import OmniMoEInputError
from omnimoe.layer import OmniMoELayer

OPS_CHOICES = ("plugin", "standard")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Beyond this many initializer bytes the model goes to external data: protobuf refuses
# messages over 2 GiB, and the graph itself needs room too.
EXTERNAL_DATA_THRESHOLD_BYTES = 1 << 30
# Tensors at least this large go to the external file when external data is used.
EXTERNAL_TENSOR_MIN_BYTES = 1024
# Offsets in the data file are aligned so runtimes can mmap tensors directly.
_ALIGNMENT = 4096
# protobuf's hard message size limit, less room for the graph itself.
_PROTOBUF_LIMIT_BYTES = (2 << 30) - (64 << 20)
_CHUNK_BYTES = 64 << 20
# Show a progress bar (when not told either way) once this many bytes are to be written.
_PROGRESS_MIN_BYTES = 256 << 20

# Written into the model's metadata_props so later commands know what they hold.
METADATA_OPS = "omnimoe.ops"
METADATA_DTYPE = "omnimoe.dtype"
METADATA_VERSION = "omnimoe.version"
METADATA_CONFIG = "omnimoe.config"  # the checkpoint's config.json, as JSON


@dataclasses.dataclass
class ExportResult:
    path: Path
    data_path: Path | None  # the external-data file, when one was written
    ops: str
    dtype: str
    opset: int
    initializer_bytes: int
    trace_seconds: float  # torch.export + ONNX translation
    write_seconds: float  # serialising graph and weights
    check_seconds: float  # onnx.checker full check + strict shape inference


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """'fp32' | 'fp16' | 'bf16' for a name or torch dtype; None stays None (keep the model's)."""
    if dtype is None:
        return None
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise OmniMoEInputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype}")
    if dtype not in DTYPES:
        raise OmniMoEInputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    return dtype


def prepare_output(path: str | os.PathLike, inputs=()) -> Path:
    """Validate the output path (and its .data sidecar) by the output policy, before any slow work."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise OmniMoEInputError(f"{path}: the output file must end in .onnx")
    check_output(path, inputs=inputs, what="ONNX model")
    check_output(path.with_name(path.name + ".data"), inputs=inputs, what="external-data file")
    return path


def estimated_weight_bytes(model: nn.Module, dtype: str | torch.dtype | None = None) -> int:
    """Bytes of the model's parameters and buffers once cast to `dtype` (shared tensors once)."""
    target = DTYPES[dtype_name(dtype)] if dtype is not None else None
    seen, total = set(), 0
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            cast = target is not None and tensor.is_floating_point() and not _keeps_fp32(module)
            total += tensor.numel() * (target.itemsize if cast else tensor.element_size())
    return total


def check_external_data_choice(model: nn.Module, dtype, external_data: bool | None) -> None:
    """Refuse, before any slow work, to put more than protobuf's 2 GiB into one file."""
    if external_data is False:
        size = estimated_weight_bytes(model, dtype)
        if size > _PROTOBUF_LIMIT_BYTES:
            raise OmniMoEInputError(
                f"{size / 2**30:.1f} GiB of weights do not fit in one protobuf file (2 GiB); use external data"
            )


def check_opset(opset: int | None) -> None:
    """The exporter and the translations emit opset-18+ op versions; 23 is the newest we test."""
    if opset is not None and (not isinstance(opset, int) or isinstance(opset, bool) or not 18 <= opset <= 23):
        raise OmniMoEInputError(f"opset must be an integer between 18 and 23, got {opset!r}")


def _keeps_fp32(module: nn.Module) -> bool:
    # BatchNorm running statistics stay float32 whatever the weights' dtype (OmniMoELayer reads
    # them with .float(); rounding them to fp16 would move the router).
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


@contextlib.contextmanager
def cast_floating_tensors(model: nn.Module, dtype: torch.dtype) -> Iterator[nn.Module]:
    """Temporarily cast the model's floating parameters and buffers to `dtype`, in place.

    The originals are restored on exit. At most one original plus its cast copy are alive per
    tensor, never a deep copy of the whole model.
    """
    saved: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
    try:
        for module in model.modules():
            if _keeps_fp32(module):
                continue
            for name, param in list(module._parameters.items()):
                if param is not None and param.is_floating_point() and param.dtype != dtype:
                    saved.append((module, name, True, param.data))
                    param.data = param.data.to(dtype)
            for name, buf in list(module._buffers.items()):
                if buf is not None and buf.is_floating_point() and buf.dtype != dtype:
                    saved.append((module, name, False, buf))
                    module._buffers[name] = buf.to(dtype)
        yield model
    finally:
        for module, name, is_param, original in reversed(saved):
            if is_param:
                module._parameters[name].data = original
            else:
                module._buffers[name] = original


def _to_export_dims(dynamic_shapes):
    """Turn {axis: "name"} into torch.export Dims (one Dim object per name, shared)."""
    if dynamic_shapes is None:
        return None
    dims: dict[str, object] = {}

    def convert(spec):
        if isinstance(spec, dict):
            return {axis: (dims.setdefault(d, torch.export.Dim(d)) if isinstance(d, str) else d) for axis, d in spec.items()}
        if isinstance(spec, (list, tuple)):
            return type(spec)(convert(s) for s in spec)
        return spec

    return convert(dynamic_shapes)


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's notices that say nothing about this model (missing torchvision
    ops, a pytree deprecation inside torch); real errors still raise."""
    import logging
    import warnings

    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            yield
    finally:
        registration_log.setLevel(level)


def _trace(model, example_inputs, ops, opset, input_names, output_names, dynamic_shapes):
    from . import translations

    kwargs = {}
    if opset is not None:
        kwargs["opset_version"] = int(opset)
    with torch.no_grad(), _quiet_exporter():
        return torch.onnx.export(
            model,
            tuple(example_inputs),
            dynamo=True,
            custom_translation_table=translations.translation_table(ops),
            input_names=list(input_names) if input_names else None,
            output_names=list(output_names) if output_names else None,
            dynamic_shapes=_to_export_dims(dynamic_shapes),
            optimize=True,
            verbose=False,
            **kwargs,
        )


def _check_custom_nodes(ir_model, ops: str, has_omnimoe_layers: bool) -> None:
    """The plugin graph holds only SPEC §3 custom nodes, one top-K + one expert node per layer
    call; the standard twin holds none."""
    from . import schemas

    counts = {op.op_type: 0 for op in schemas.OPS}
    for node in ir_model.graph.all_nodes():
        if node.domain == schemas.DOMAIN:
            if ops == "standard":
                raise RuntimeError(f"standard-op export still contains custom node {node.op_type}")
            schemas.check_ir_node(node)
            counts[node.op_type] += 1
        elif node.domain not in ("", "ai.onnx"):
            raise RuntimeError(f"unexpected node domain {node.domain!r} ({node.op_type})")
    if ops == "plugin" and has_omnimoe_layers:
        topk, experts = counts[schemas.PRODUCT_KEY_TOPK.op_type], counts[schemas.EXPERT_GROUPED_MATMUL.op_type]
        if topk == 0 or topk != experts:
            # e.g. a layer whose forward bypassed the omnimoe dispatchers while tracing
            raise RuntimeError(f"plugin export has {topk} top-K and {experts} expert nodes; expected one pair per layer")


def _strip_exporter_metadata(ir_model) -> None:
    """Drop the exporter's debugging metadata (stack traces with the exporting machine's file
    paths, FX node dumps, name scopes, the ExportedProgram signature) from the model, its graphs,
    functions, nodes and values: none of it is needed to run the model, and users ship the file."""
    ir_model.metadata_props.clear()
    ir_model.doc_string = None
    graphs = [ir_model.graph, *ir_model.functions.values()]
    for graph in graphs:
        graph.metadata_props.clear()
        for node in graph.all_nodes():  # subgraphs included
            node.metadata_props.clear()
            node.doc_string = None
            for value in node.outputs:
                value.metadata_props.clear()
                value.doc_string = None
        for value in list(graph.inputs) + list(getattr(graph, "initializers", {}).values()):
            value.metadata_props.clear()
            value.doc_string = None


def _tensor_nbytes(tensor) -> int:
    return int(tensor.nbytes)


def _write_tensor_bytes(tensor, f, on_bytes) -> None:
    """Write one initializer's raw little-endian bytes to f in chunks (no full extra copy)."""
    raw = getattr(tensor, "raw", None)
    if isinstance(raw, torch.Tensor):
        flat = raw.detach()
        if flat.device.type != "cpu":
            flat = flat.cpu()
        flat = flat.contiguous().reshape(-1).view(torch.uint8)
        for start in range(0, flat.numel(), _CHUNK_BYTES):
            piece = flat[start : start + _CHUNK_BYTES].numpy()
            f.write(memoryview(piece))
            on_bytes(piece.nbytes)
        return
    data = tensor.tobytes()
    f.write(data)
    on_bytes(len(data))


def _progress(total_bytes: int, show: bool | None):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    if show is None:
        show = total_bytes >= _PROGRESS_MIN_BYTES
    return Progress(
        TextColumn("[bold]writing weights[/bold] {task.description}"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not show,
        transient=False,
    )


def _save(ir_model, model_path: Path, data_path: Path | None, progress: bool | None) -> None:
    """Serialise the graph; stream large initializers into data_path (if given)."""
    import onnx
    from onnxscript import ir

    initializers = list(ir_model.graph.initializers.values())
    if data_path is not None:
        big = [v for v in initializers if v.const_value is not None and _tensor_nbytes(v.const_value) >= EXTERNAL_TENSOR_MIN_BYTES]
        total = sum(_tensor_nbytes(v.const_value) for v in big)
        offset = 0
        with _progress(total, progress) as bar, open(data_path, "wb") as f:
            task = bar.add_task(data_path.name, total=total)
            for value in big:
                tensor = value.const_value
                pad = (-offset) % _ALIGNMENT
                if pad:
                    f.write(b"\0" * pad)
                    offset += pad
                bar.update(task, description=value.name)
                nbytes = _tensor_nbytes(tensor)
                _write_tensor_bytes(tensor, f, lambda n: bar.advance(task, n))
                value.const_value = ir.ExternalTensor(
                    location=data_path.name,
                    offset=offset,
                    length=nbytes,
                    dtype=tensor.dtype,
                    shape=tensor.shape,
                    name=value.name,
                    base_dir=str(data_path.parent),
                )
                offset += nbytes
            bar.update(task, description=data_path.name)
            f.flush()
            os.fsync(f.fileno())
    proto = ir.serde.serialize_model(ir_model)
    onnx.save_model(proto, str(model_path))


def check_onnx_file(path: str | os.PathLike) -> None:
    """onnx.checker full check (by path, so >2 GB models work) and strict shape inference."""
    import tempfile

    import onnx

    from . import schemas

    schemas.register_onnx_schemas()
    path = Path(path)
    # check_custom_domain: the omnimoe nodes are checked against the registered schemas too.
    onnx.checker.check_model(str(path), full_check=True, check_custom_domain=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        onnx.shape_inference.infer_shapes_path(
            str(path), str(Path(tmp) / "inferred.onnx"), check_type=True, strict_mode=True, data_prop=True
        )


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    example_inputs: Sequence[torch.Tensor],
    ops: str = "plugin",
    dtype: str | torch.dtype | None = None,
    opset: int | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_shapes=None,
    external_data: bool | None = None,
    progress: bool | None = None,
    check: bool = True,
) -> ExportResult:
    """Export `model` (any nn.Module; OmniMoE layers inside become SPEC §3 nodes or their twin).

    example_inputs: positional inputs for tracing; floating ones are cast to `dtype`.
    dtype: "fp32" | "fp16" | "bf16" (or a torch dtype); None keeps the model's dtype. Casting is
        temporary (the model is restored afterwards); BatchNorm statistics stay float32.
    dynamic_shapes: like torch.export's, per input; axis names may be plain strings, e.g.
        ({0: "batch", 1: "seq"},) -- they become the ONNX symbolic dimension names.
    external_data: None = only when the weights exceed EXTERNAL_DATA_THRESHOLD_BYTES; the data
        file is `<path>.data` next to the model.
    progress: None = progress bar only for large weights.
    """
    if ops not in OPS_CHOICES:
        raise OmniMoEInputError(f"ops must be one of {OPS_CHOICES}, got {ops!r}")
    name = dtype_name(dtype)
    check_opset(opset)
    check_external_data_choice(model, name, external_data)
    path = prepare_output(path)

    was_training = model.training
    model.eval()
    target = DTYPES[name] if name else None
    inputs = [
        t.to(target) if (target is not None and isinstance(t, torch.Tensor) and t.is_floating_point()) else t
        for t in example_inputs
    ]
    cast = cast_floating_tensors(model, target) if target is not None else contextlib.nullcontext(model)
    try:
        with cast:
            t0 = time.perf_counter()
            program = _trace(model, inputs, ops, opset, input_names, output_names, dynamic_shapes)
            trace_seconds = time.perf_counter() - t0
            ir_model = program.model
            _check_custom_nodes(ir_model, ops, any(isinstance(m, OmniMoELayer) for m in model.modules()))
            graph_dtype = name or _weights_dtype_name(model)
            _strip_exporter_metadata(ir_model)
            ir_model.metadata_props[METADATA_OPS] = ops
            ir_model.metadata_props[METADATA_DTYPE] = graph_dtype
            ir_model.metadata_props[METADATA_VERSION] = omnimoe.__version__
            if callable(getattr(getattr(model, "config", None), "to_dict", None)):
                ir_model.metadata_props[METADATA_CONFIG] = json.dumps(model.config.to_dict(), sort_keys=True)
            init_bytes = sum(
                _tensor_nbytes(v.const_value) for v in ir_model.graph.initializers.values() if v.const_value is not None
            )
            use_external = external_data if external_data is not None else init_bytes > EXTERNAL_DATA_THRESHOLD_BYTES
            if not use_external and init_bytes > _PROTOBUF_LIMIT_BYTES:
                raise OmniMoEInputError(
                    f"{init_bytes / 2**30:.1f} GiB of weights do not fit in one protobuf file (2 GiB); use external data"
                )
            data_path = path.with_name(path.name + ".data") if use_external else None
            finals = [path] + ([data_path] if data_path else [])
            t1 = time.perf_counter()
            # A stale data file from an earlier external-data export would mislead.
            stale = [] if data_path else [path.with_name(path.name + ".data")]
            try:
                with atomic_files(finals, stale=stale) as tmp_paths:
                    tmp_model = tmp_paths[0]
                    tmp_data = tmp_paths[1] if data_path else None
                    _save(ir_model, tmp_model, tmp_data, progress)
                    write_seconds = time.perf_counter() - t1
                    t2 = time.perf_counter()
                    if check:
                        check_onnx_file(tmp_model)
                    check_seconds = time.perf_counter() - t2
            except OSError as e:  # unwritable directory, disk full: the user's to fix
                raise OmniMoEInputError(f"{path}: cannot write ({e.strerror or e})") from None
            del program, ir_model
    finally:
        model.train(was_training)
    return ExportResult(
        path=path,
        data_path=data_path,
        ops=ops,
        dtype=graph_dtype,
        opset=int(opset) if opset is not None else _model_opset(path),
        initializer_bytes=init_bytes,
        trace_seconds=trace_seconds,
        write_seconds=write_seconds,
        check_seconds=check_seconds,
    )


def _weights_dtype_name(model: nn.Module) -> str:
    """The model's weight dtype as 'fp32' | 'fp16' | 'bf16' (expert tables first), else torch's name."""
    layers = [m for m in model.modules() if isinstance(m, OmniMoELayer)]
    tensors = [layers[0].up_embed.weight] if layers else [p for p in model.parameters() if p.is_floating_point()]
    if not tensors:
        return "none"
    for short, value in DTYPES.items():
        if tensors[0].dtype == value:
            return short
    return str(tensors[0].dtype).removeprefix("torch.")


def _model_opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
