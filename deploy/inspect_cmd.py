"""`omnimoe inspect PATH [--json]`: what a checkpoint, an ONNX model or an engine is.

- checkpoint directory (config.json + model.safetensors or sharded safetensors): config, the
  weight files, tensors with shapes and dtypes, parameter count, and the I/O its export will have;
- ONNX model: metadata (omnimoe version, config, dtype, ops), opsets and producer, inputs and
  outputs with their dynamic axes, op counts, every omnimoe custom node with its attributes,
  weights (and external data), precision;
- engine (.engine/.plan/.trt): an engine's layers, profiles and kernels can only be read by a
  TensorRT runtime on a GPU, so this reads what `omnimoe build` recorded next to it in
  `<engine>.json` (backend and version, precision, profiles, plugin kind and library, SMs, plugin
  layers, source ONNX) and says so when there is no such record.

Every report also lists the versions of the tools installed here. `--json` prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
from importlib import metadata
from pathlib import Path

from omnimoe.errors import OmniMoEInputError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
TOOLS = ("omnimoe", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "onnxruntime-extensions", "onnxscript", "polygraphy",
         "safetensors", "tensorrt", "tensorrt_rtx_cu13", "tensorrt-rtx", "triton")
# What `omnimoe build` records in <engine>.json (missing keys are shown as unknown).
# safetensors' and ONNX's dtype names -> the names omnimoe uses for precision
PRECISION_NAMES = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", "float": "fp32", "float16": "fp16", "bfloat16": "bf16"}
ENGINE_RECORD_KEYS = ("omnimoe_version", "backend", "backend_version", "precision", "io", "profiles", "plugins",
                      "plugin_library", "sms", "plugin_layers", "onnx")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", metavar="CKPT_DIR|MODEL.onnx|MODEL.engine")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def tool_versions() -> dict:
    versions = {}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


# --- checkpoints ---------------------------------------------------------------------------------
def _checkpoint_io(config: dict) -> tuple[list, list]:
    """The I/O `omnimoe export` gives this checkpoint (batch and seq dynamic)."""
    if config.get("model_type") == "tiny_omni_lm":
        return ([{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
                [{"name": "logits", "dtype": "float", "shape": ["batch", "seq", config.get("vocab_size")]}])
    d = config.get("hidden_size")
    return ([{"name": "x", "dtype": "float", "shape": ["batch", "seq", d]}],
            [{"name": "y", "dtype": "float", "shape": ["batch", "seq", d]}])


def _is_buffer(key: str) -> bool:
    """BatchNorm statistics: float32 whatever the weights' dtype, and not parameters."""
    return ".running_" in key or key.endswith("num_batches_tracked")


def inspect_checkpoint(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    from omnimoe.checkpoint import read_config, weight_files

    config = read_config(path)
    weights = weight_files(path)
    if weights.name.endswith(".index.json"):
        weight_map = json.loads(weights.read_text()).get("weight_map", {})
        files = sorted(set(weight_map.values()))
    else:
        files = [weights.name]
    tensors = {}
    for name in files:
        try:
            with safe_open(str(path / name), framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    tensors[key] = {"shape": list(s.get_shape()), "dtype": s.get_dtype(), "file": name}
        except (SafetensorError, OSError) as e:
            raise OmniMoEInputError(f"{path / name}: not a readable safetensors file ({e})") from None
    dtypes = sorted({PRECISION_NAMES.get(t["dtype"], t["dtype"]) for k, t in tensors.items() if not _is_buffer(k)})
    inputs, outputs = _checkpoint_io(config)
    return {
        "kind": "checkpoint",
        "path": str(path),
        "model_type": config.get("model_type", "omnimoe_layer"),
        "config": config,
        "weights": {"files": [{"name": n, "bytes": (path / n).stat().st_size} for n in files],
                    "index": weights.name if weights.name.endswith(".index.json") else None},
        "parameters": sum(math.prod(t["shape"]) for k, t in tensors.items() if not _is_buffer(k)),
        "precision": dtypes,
        "tensors": tensors,
        "inputs": inputs,
        "outputs": outputs,
    }


def inspect_layers_index(path: Path) -> dict:
    """`omnimoe convert --prefix 'a.*.b.'` output: one checkpoint per layer and layers.json."""
    try:
        index = json.loads((path / "layers.json").read_text())
        layers = dict(index["layers"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OmniMoEInputError(f"{path / 'layers.json'}: not a layer index ({type(e).__name__})") from None
    return {"kind": "layer index", "path": str(path), "source": index.get("source"),
            "prefix_pattern": index.get("prefix_pattern"),
            "layers": {prefix: inspect_checkpoint(path / sub) for prefix, sub in layers.items()}}


# --- ONNX ----------------------------------------------------------------------------------------
def _value_info(value) -> dict:
    import onnx

    t = value.type.tensor_type
    shape = [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
             for d in t.shape.dim]
    return {"name": value.name, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower(), "shape": shape}


def inspect_onnx(path: Path) -> dict:
    import onnx
    from onnx import external_data_helper

    from export import schemas

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several types on garbage
        raise OmniMoEInputError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    graph = model.graph
    meta = {p.key: p.value for p in model.metadata_props}
    if "omnimoe.config" in meta:
        try:
            meta["omnimoe.config"] = json.loads(meta["omnimoe.config"])
        except ValueError:
            pass
    op_counts: dict[str, int] = {}
    custom = []
    for node in graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        op_counts[key] = op_counts.get(key, 0) + 1
        if node.domain == schemas.DOMAIN:
            attrs = {}
            for a in node.attribute:
                value = onnx.helper.get_attribute_value(a)
                attrs[a.name] = value.decode() if isinstance(value, bytes) else value
            custom.append({"name": node.name, "op_type": node.op_type, "domain": node.domain, "attributes": attrs,
                           "inputs": list(node.input), "outputs": list(node.output)})
    init_bytes, external = 0, set()
    init_types: dict[str, int] = {}
    for t in graph.initializer:
        n = math.prod(t.dims) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        init_bytes += n
        type_name = onnx.TensorProto.DataType.Name(t.data_type).lower()
        init_types[type_name] = init_types.get(type_name, 0) + n
        if external_data_helper.uses_external_data(t):
            external.update(e.value for e in t.external_data if e.key == "location")
    inputs = [_value_info(v) for v in graph.input]
    outputs = [_value_info(v) for v in graph.output]
    dynamic = {v["name"]: {axis: d for axis, d in enumerate(v["shape"]) if not isinstance(d, int)} for v in inputs + outputs}
    largest = max(init_types, key=init_types.get) if init_types else None
    precision = meta.get("omnimoe.dtype") or PRECISION_NAMES.get(largest, largest)
    return {
        "kind": "onnx",
        "path": str(path),
        "graph": "plugin" if custom else "standard",
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        "metadata": meta,
        "precision": precision,
        "inputs": inputs,
        "outputs": outputs,
        "dynamic_axes": {k: v for k, v in dynamic.items() if v},
        "ops": dict(sorted(op_counts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "custom_nodes": custom,
        "weights": {"initializers": len(graph.initializer), "bytes": init_bytes, "by_dtype": init_types,
                    "external_data": sorted(external)},
    }


# --- engines -------------------------------------------------------------------------------------
def inspect_engine(path: Path) -> dict:
    from deploy.build import sidecar_path

    record_path = sidecar_path(path)
    info = {"kind": "engine", "path": str(path), "bytes": path.stat().st_size, "build_record": None}
    if not record_path.is_file():
        info["note"] = (f"no build record {record_path.name} next to the engine: an engine's layers, profiles and "
                        "kernels can only be read by a TensorRT runtime on a GPU, not here")
        return info
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as e:
        raise OmniMoEInputError(f"{record_path}: not a readable build record ({type(e).__name__})") from None
    if not isinstance(record, dict):
        raise OmniMoEInputError(f"{record_path}: expected a JSON object")
    info["build_record"] = record_path.name
    info["note"] = (f"from the build record {record_path.name} (written by omnimoe build); the engine itself "
                    "can only be read by a TensorRT runtime on a GPU")
    for key in ENGINE_RECORD_KEYS:
        info[key] = record.get(key)
    info["other_recorded"] = {k: v for k, v in record.items() if k not in ENGINE_RECORD_KEYS}
    return info


def inspect_path(path: Path) -> dict:
    if path.is_dir():
        if not (path / "config.json").exists() and (path / "layers.json").is_file():
            info = inspect_layers_index(path)
        else:
            info = inspect_checkpoint(path)
    elif path.suffix == ".onnx" and path.is_file():
        info = inspect_onnx(path)
    elif path.suffix in ENGINE_SUFFIXES and path.is_file():
        info = inspect_engine(path)
    elif not path.exists():
        raise OmniMoEInputError(f"{path}: no such file or directory")
    else:
        raise OmniMoEInputError(f"{path}: not a checkpoint directory, an .onnx model or an engine ({', '.join(ENGINE_SUFFIXES)})")
    info["tools"] = tool_versions()
    return info


# --- text ----------------------------------------------------------------------------------------
def _shape(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _text(info: dict, indent: str = "") -> list[str]:
    lines = [f"{indent}{info['path']}: {info['kind']}"]
    add = lambda s: lines.append(indent + "  " + s)  # noqa: E731
    kind = info["kind"]
    if kind == "layer index":
        add(f"source {info['source']}, prefix {info['prefix_pattern']}, {len(info['layers'])} layers")
        for sub in info["layers"].values():
            lines += _text(sub, indent + "  ")
        return lines
    if kind == "checkpoint":
        add(f"model_type {info['model_type']}, {info['parameters']:,} parameters, precision {', '.join(info['precision'])}")
        add("config: " + ", ".join(f"{k}={v}" for k, v in info["config"].items() if k != "model_type"))
        files = ", ".join(f"{f['name']} ({f['bytes'] / 2**20:.1f} MiB)" for f in info["weights"]["files"])
        add(f"weights: {files}" + (f" via {info['weights']['index']}" if info["weights"]["index"] else ""))
        for key, t in info["tensors"].items():
            add(f"  {key} {t['dtype']} {_shape(t['shape'])}")
    if kind == "onnx":
        meta = info["metadata"]
        add(f"{info['graph']} graph, precision {info['precision']}, producer {info['producer']}, IR {info['ir_version']}, "
            f"opsets " + ", ".join(f"{d} {v}" for d, v in info["opsets"].items()))
        if "omnimoe.version" in meta:
            add(f"exported by omnimoe {meta['omnimoe.version']}")
        if isinstance(meta.get("omnimoe.config"), dict):
            add("config: " + ", ".join(f"{k}={v}" for k, v in meta["omnimoe.config"].items() if k != "model_type"))
        add("ops: " + ", ".join(f"{op} x{n}" for op, n in info["ops"].items()))
        for node in info["custom_nodes"]:
            add(f"  {node['domain']}::{node['op_type']} {node['name']}: "
                + ", ".join(f"{k}={v}" for k, v in node["attributes"].items()))
        w = info["weights"]
        add(f"weights: {w['initializers']} initializers, {w['bytes'] / 2**20:.1f} MiB"
            + (f" in {', '.join(w['external_data'])}" if w["external_data"] else ""))
    if kind in ("checkpoint", "onnx"):
        for role in ("inputs", "outputs"):
            for v in info[role]:
                add(f"{role[:-1]} {v['name']} {v['dtype']} {_shape(v['shape'])}")
        dynamic = info.get("dynamic_axes")
        if dynamic:
            add("dynamic axes: " + "; ".join(f"{n} " + ", ".join(f"{a}={d}" for a, d in axes.items()) for n, axes in dynamic.items()))
    if kind == "engine":
        add(f"{info['bytes'] / 2**20:.1f} MiB; {info['note']}")
        if info["build_record"]:
            unknown = "unknown (not recorded)"
            add(f"built by omnimoe {info['omnimoe_version'] or unknown} with {info['backend'] or unknown} "
                f"{info['backend_version'] or ''}".rstrip())
            add(f"precision {info['precision'] or unknown}; source ONNX {info['onnx'] or unknown}")
            for v in info["io"] or []:
                if isinstance(v, dict):
                    add(f"{v.get('kind', 'tensor')} {v.get('name')} {str(v.get('dtype', '')).lower()} "
                        f"{_shape([None if d == -1 else d for d in v.get('shape') or []])}")
            plugins = info["plugins"] or unknown
            library = f" ({info['plugin_library']})" if info["plugin_library"] else ""
            if info["sms"]:
                kernels = "kernels for SMs " + ", ".join(map(str, info["sms"]))
            elif info["plugins"] == "python":
                kernels = "kernels compiled by Triton when the engine runs"
            else:
                kernels = f"kernels for SMs {unknown}"
            add(f"plugins {plugins}{library}; {kernels}")
            profiles = info["profiles"]
            profiles = [profiles] if isinstance(profiles, dict) else profiles if isinstance(profiles, list) else []
            for index, profile in enumerate(profiles):
                for name, shapes in (profile.items() if isinstance(profile, dict) else []):
                    shapes = shapes if isinstance(shapes, (list, tuple)) else [shapes]
                    add(f"profile {index} {name}: min / opt / max "
                        + " / ".join(_shape(s) if isinstance(s, (list, tuple)) else str(s) for s in shapes))
            if not profiles:
                add(f"profiles {unknown}")
            for layer in info["plugin_layers"] or []:
                if isinstance(layer, dict):
                    attrs = ", ".join(f"{k}={v}" for k, v in (layer.get("attributes") or {}).items())
                    add(f"plugin layer {layer.get('name')}: {layer.get('plugin')}" + (f" ({attrs})" if attrs else ""))
                else:
                    add(f"plugin layer {layer}")
            if info["other_recorded"]:
                add("also recorded (see --json): " + ", ".join(info["other_recorded"]))
    if not indent:
        lines.append("tools here: " + ", ".join(f"{k} {v}" for k, v in info["tools"].items()))
    return lines


def run(args: argparse.Namespace) -> int:
    info = inspect_path(Path(args.path))
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        print("\n".join(_text(info)))
    return 0
