"""`omnimoe build MODEL.onnx -o MODEL.engine`: ONNX (plugin graph) -> serialized TensorRT engine.

    omnimoe build MODEL.onnx -o DIR/MODEL.engine [--plugins native|python] [--sm 80,86,...]
        [--backend auto|tensorrt|tensorrt-rtx] [--precision fp32|fp16|bf16]
        [--tokens MIN:OPT:MAX | --min-shapes/--opt-shapes/--max-shapes NAME:AxBxC ...]
        [--mem-pool-size workspace:SIZE] [--timing-cache FILE]

The custom `omnimoe::` nodes become plugin layers through the ONNX parser (no graph rewriting).
With `--plugins native` (default) they are the C++ plugins of trt_plugins.native: the model's
Triton kernels are compiled ahead of time for each `--sm` into DIR/libomnimoe_trt_plugins.so
(written beside the engine with its generated source), which the build loads instead of the
Python plugins; engine + library need no Python. DIR/MODEL.engine.json records what the engine
holds (`omnimoe inspect`, `serve-repo` and the trt runner read it). TensorRT-RTX builds on a
machine without a GPU. Precision: TensorRT-RTX and TensorRT >= 11 networks are strongly typed, so
`--precision` must match the ONNX tensor types (re-export with `omnimoe export --dtype`); TensorRT
10.x can also lower an fp32 model with its FP16/BF16 builder flags. `--tokens` sets one profile on
the token axis: the last dynamic dimension of each input (`T` of a layer's x [T, d], `S` of a
model's input_ids [B, S]), other dynamic dimensions (batch) fixed to 1; the trtexec-style shape
flags give full profiles (several, batch > 1). Progress goes to stderr; every output is written
atomically; bad input is one line and exit code 2.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from omnimoe.errors import OmniMoEInputError

PRECISIONS = ("fp32", "fp16", "bf16")
DEFAULT_TOKENS = "1:256:4096"
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def add_arguments(parser) -> None:
    from trt_plugins._trt import BACKENDS
    from trt_plugins.native.aot import DEFAULT_SMS

    parser.add_argument("model", help="ONNX model with omnimoe:: plugin nodes (omnimoe export --ops plugin)")
    parser.add_argument("-o", "--output", required=True, help="where to write the serialized engine")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="TensorRT flavour (default: auto)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="engine precision (default: the ONNX model's float type; must match it on strongly typed backends)",
    )
    parser.add_argument(
        "--tokens",
        default=DEFAULT_TOKENS,
        metavar="MIN:OPT:MAX",
        help=f"optimization profile of the token axis (default {DEFAULT_TOKENS}; a single N means N:N:N)",
    )
    parser.add_argument(
        "--plugins",
        choices=("native", "python"),
        default="native",
        help="native (default): write libomnimoe_trt_plugins.so beside the engine (C++ plugins running AOT-compiled "
        "Triton kernels; trtexec/Triton server/DeepStream/Jetson load it, no Python needed); python: the Python "
        "plugins (the process running the engine must import trt_plugins)",
    )
    parser.add_argument(
        "--sm",
        default=",".join(map(str, DEFAULT_SMS)),
        metavar="LIST",
        help="compute capabilities the native library gets cubins for (default %(default)s; newer GPUs use a PTX fallback)",
    )
    parser.add_argument("--trt-include", default=None, metavar="DIR", help="TensorRT headers for the native library "
                        "(default: $TENSORRT_INCLUDE_DIR, the SDK's usual places, the kernel-lens wheel's copy)")
    parser.add_argument("--cuda-include", default=None, metavar="DIR", help="directory with cuda.h (default: $CUDA_HOME, "
                        "/usr/local/cuda, the triton wheel's copy)")
    for bound in ("min", "opt", "max"):
        parser.add_argument(
            f"--{bound}-shapes", action="append", default=[], metavar="NAME:AxBxC[,NAME:...]",
            help=f"{bound} shapes of an optimization profile, as trtexec spells them (repeat the three flags for "
            "several profiles; batch > 1 allowed; replaces --tokens)",
        )
    parser.add_argument(
        "--mem-pool-size", default=None, metavar="workspace:SIZE",
        help="workspace limit as trtexec spells it (SIZE in MiB, or with a K/M/G suffix); the plugins' workspace at the "
        "profile maximum must fit",
    )
    parser.add_argument("--timing-cache", default=None, metavar="FILE", help="read (if present) and update this timing cache")
    parser.add_argument("--no-progress", action="store_true", help="do not show build progress")


# --------------------------------------------------------------------------------------------
# Input validation (no TensorRT needed)


def parse_tokens(text: str) -> tuple[int, int, int]:
    """'MIN:OPT:MAX' (or 'N') -> (min, opt, max) with 1 <= min <= opt <= max."""
    parts = str(text).split(":")
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise OmniMoEInputError(f"--tokens must be MIN:OPT:MAX (e.g. 1:256:4096), got {text!r}")
    try:
        lo, opt, hi = (int(p) for p in parts)
    except ValueError:
        raise OmniMoEInputError(f"--tokens must be three integers MIN:OPT:MAX, got {text!r}") from None
    if not 1 <= lo <= opt <= hi:
        raise OmniMoEInputError(f"--tokens needs 1 <= MIN <= OPT <= MAX, got {lo}:{opt}:{hi}")
    if hi > 2**31 - 1:
        raise OmniMoEInputError(f"--tokens MAX must fit in int32, got {hi}")
    return lo, opt, hi


def parse_shapes(text: str, flag: str) -> dict[str, tuple[int, ...]]:
    """trtexec's 'x:1x256x64,ids:4x128' -> {'x': (1, 256, 64), 'ids': (4, 128)}."""
    shapes = {}
    for item in str(text).split(","):
        name, sep, dims = item.strip().rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise OmniMoEInputError(f"{flag} takes NAME:AxBxC[,NAME:AxBxC], got {item.strip()!r}") from None
        if any(d < 0 for d in shape):
            raise OmniMoEInputError(f"{flag} {name}: dimensions must be >= 0, got {dims}")
        if name in shapes:
            raise OmniMoEInputError(f"{flag} names input {name!r} twice")
        shapes[name] = shape
    return shapes


def parse_profiles(mins, opts, maxs) -> list[dict]:
    """The k-th --min/--opt/--max-shapes form profile k: [{input: (min, opt, max)}, ...]."""
    if not (len(mins) == len(opts) == len(maxs)):
        raise OmniMoEInputError(
            f"give --min-shapes, --opt-shapes and --max-shapes once per profile (got {len(mins)}, {len(opts)}, {len(maxs)})"
        )
    profiles = []
    for k, texts in enumerate(zip(mins, opts, maxs)):
        bounds = [parse_shapes(t, f"--{b}-shapes") for t, b in zip(texts, ("min", "opt", "max"))]
        if not (bounds[0].keys() == bounds[1].keys() == bounds[2].keys()):
            raise OmniMoEInputError(f"profile {k}: --min/--opt/--max-shapes must name the same inputs")
        profile = {}
        for name in bounds[0]:
            lo, opt, hi = (b[name] for b in bounds)
            if not (len(lo) == len(opt) == len(hi)) or not all(a <= b <= c for a, b, c in zip(lo, opt, hi)):
                raise OmniMoEInputError(f"profile {k}, input {name}: needs min <= opt <= max of one rank, got {lo}, {opt}, {hi}")
            profile[name] = (lo, opt, hi)
        profiles.append(profile)
    return profiles


def parse_mem_pool(text: str | None) -> int | None:
    """trtexec's --memPoolSize 'workspace:SIZE' (MiB, or a K/M/G suffix) -> bytes."""
    if text is None:
        return None
    pool, sep, size = str(text).partition(":")
    if not sep or pool.strip().lower() != "workspace":
        raise OmniMoEInputError(f"--mem-pool-size takes workspace:SIZE (e.g. workspace:1024 for 1 GiB), got {text!r}")
    size = size.strip()
    unit = {"k": 2**10, "m": 2**20, "g": 2**30}.get(size[-1:].lower())
    try:
        value = float(size[:-1] if unit else size) * (unit or 2**20)
    except ValueError:
        raise OmniMoEInputError(f"--mem-pool-size workspace:SIZE needs a number, got {size!r}") from None
    if not value >= 0 or value == float("inf"):
        raise OmniMoEInputError(f"--mem-pool-size must be a finite size >= 0, got {size!r}")
    return int(value)


def plugin_workspace_bytes(model, profiles: list[dict]) -> tuple[int, int]:
    """(bytes, tokens): the largest workspace any omnimoe plugin asks for at a profile's maximum,
    where tokens = the flattened token count (batch x sequence) the plugins see there."""
    from omnimoe.kernels import expert_workspace_bytes, topk_workspace_bytes
    from trt_plugins import native

    tokens = 0
    for profile in profiles:
        for lo_opt_hi in profile.values():
            hi = lo_opt_hi[2]
            # [batch, seq, d] activations or [batch, seq] token ids: every axis but d is tokens.
            shape = hi[:-1] if len(hi) >= 3 else hi
            count = 1
            for dim in shape:
                count *= int(dim)
            tokens = max(tokens, count)
    need = 0
    for v in native.variants_from_onnx(model):
        if isinstance(v, native.TopKVariant):
            need = max(need, topk_workspace_bytes(tokens, v.grid_side, v.top_k))
        else:
            need = max(need, expert_workspace_bytes(tokens, v.top_k, v.num_experts, v.hidden_size))
    return need, tokens


def load_onnx_header(path: str | os.PathLike):
    """The ModelProto without external weights (enough to inspect types and nodes)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise OmniMoEInputError(f"ONNX model not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types for garbage input
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise OmniMoEInputError(f"{path} is not a valid ONNX model ({first})") from None
    if not model.graph.node or not model.graph.output:
        raise OmniMoEInputError(f"{path} is not a valid ONNX model (its graph has no nodes or no outputs)")
    return model


def _all_nodes(model):
    yield from model.graph.node
    for function in model.functions:
        yield from function.node


def onnx_precision(model) -> str:
    """fp32 | fp16 | bf16: the low-precision float type the model was exported in (fp32 if none).

    `omnimoe export` writes it into the metadata (`omnimoe.dtype`); otherwise the tensor types
    decide: an fp16/bf16 export keeps the router's log-softmax and the gates in fp32 (SPEC §1), so
    the presence of any fp16 / bf16 tensor decides.
    """
    from onnx import TensorProto

    # `omnimoe export` records the dtype it exported with; trust it when present.
    meta = {p.key: p.value for p in model.metadata_props}.get("omnimoe.dtype")
    if meta in PRECISIONS:
        return meta
    types = {init.data_type for init in model.graph.initializer}
    for vi in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        if vi.type.HasField("tensor_type"):
            types.add(vi.type.tensor_type.elem_type)
    if TensorProto.DOUBLE in types:
        raise OmniMoEInputError("unsupported precision: the ONNX model has float64 tensors (export fp32, fp16 or bf16)")
    low = [name for name, t in (("fp16", TensorProto.FLOAT16), ("bf16", TensorProto.BFLOAT16)) if t in types]
    if len(low) > 1:
        raise OmniMoEInputError("unsupported precision: the ONNX model mixes float16 and bfloat16 tensors")
    return low[0] if low else "fp32"


def custom_nodes(model) -> list[tuple[str, str, str]]:
    """(domain, op_type, node name) of every node outside the standard ONNX domains and not a
    call to one of the model's local functions."""
    local = {(f.domain, f.name) for f in model.functions}
    out = []
    for node in _all_nodes(model):
        if node.domain in _STANDARD_DOMAINS or (node.domain, node.op_type) in local:
            continue
        out.append((node.domain, node.op_type, node.name))
    return out


def check_plugins_available(trt, model, registered=None) -> None:
    """Every custom node must have a plugin creator the parser will find (name, version, domain).

    `registered`: {(op_type, namespace)} to check against instead of `trt`'s registry (the native
    library's plugins, before it is built)."""
    from export.schemas import DOMAIN, OPS

    if registered is None:
        registered = {
            (getattr(c, "name", None), getattr(c, "plugin_namespace", None))
            for c in trt.get_plugin_registry().all_creators
        }
    for domain, op_type, name in custom_nodes(model):
        if (op_type, domain) in registered or (op_type, "") in registered:
            continue
        known = ", ".join(sorted(op for op, ns in registered if ns == DOMAIN and op in {o.op_type for o in OPS})) or "none"
        raise OmniMoEInputError(
            f"plugin missing: node {name or '?'} is {domain}::{op_type}, for which no TensorRT plugin is "
            f"registered (omnimoe plugins: {known})"
        )


def _precision_plan(trt, model_precision: str, precision: str | None) -> tuple[str, bool]:
    """(engine precision, strongly typed network?) or a one-line error."""
    from trt_plugins._trt import backend_of, is_strongly_typed_only

    precision = precision or model_precision
    if precision == model_precision:
        return precision, True
    if is_strongly_typed_only(trt):
        name = "TensorRT-RTX" if backend_of(trt) == "tensorrt-rtx" else f"TensorRT {trt.__version__}"
        raise OmniMoEInputError(
            f"unsupported precision: --precision {precision} but the ONNX model is {model_precision}; {name} "
            f"takes precision from the tensor types, re-export with `omnimoe export --dtype {precision}`"
        )
    if model_precision != "fp32":
        raise OmniMoEInputError(
            f"unsupported precision: --precision {precision} cannot lower a {model_precision} ONNX model; "
            f"re-export with `omnimoe export --dtype {precision}`"
        )
    return precision, False


# --------------------------------------------------------------------------------------------
# TensorRT side


def _make_logger(trt):
    class CapturingLogger(trt.ILogger):
        """Keeps errors (for the one-line message) and warnings; prints nothing by itself."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.warnings: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                self.warnings.append(str(msg))

    return CapturingLogger()


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclasses.dataclass
class ParsedNetwork:
    trt: object
    logger: object
    builder: object
    network: object
    parser: object
    model: object  # the ModelProto header
    model_precision: str

    def plugin_layers(self) -> list:
        """The network's IPluginV3Layers (downcast), in network order."""
        out = []
        for i in range(self.network.num_layers):
            layer = self.network.get_layer(i)
            if layer.type == self.trt.LayerType.PLUGIN_V3:
                layer.__class__ = self.trt.IPluginV3Layer
                out.append(layer)
        return out


def native_library_error(path, *, clear: bool = False) -> str:
    """The last error message of a loaded native plugin library ('' if none); `clear` forgets it
    (before a build, so a message left by an earlier one is never reported for this one)."""
    from trt_plugins.native import NativeLib

    lib = NativeLib(path)
    if clear:
        lib.clear_error()
        return ""
    return lib.error().removeprefix("omnimoe native plugins: ")


def load_plugin_library(trt, path) -> object:
    """Load a native plugin library into `trt`'s registry, in place of the Python plugins (same
    names and namespace); returns the handle for `deregister_library`. Its messages reach the
    caller through `native_library_error` (TensorRT-RTX gives plugin libraries no logger)."""
    import trt_plugins

    os.environ["OMNIMOE_NATIVE_QUIET"] = "1"
    trt_plugins.unregister(trt)
    handle = trt.get_plugin_registry().load_library(str(path))
    if handle is None:
        raise OmniMoEInputError(f"TensorRT could not load the plugin library {path}")
    return handle


def parse_network(
    model_path, *, backend: str = "auto", strongly_typed: bool = True, trt=None, model=None, python_plugins=True
) -> ParsedNetwork:
    """Validate the ONNX file, register the Python plugins (unless a native library was loaded:
    python_plugins=False) and parse it into a TensorRT network."""
    import trt_plugins

    if model is None:
        model = load_onnx_header(model_path)
    model_precision = onnx_precision(model)
    trt = trt_plugins.register(trt, backend=backend) if python_plugins else (trt or trt_plugins.load(backend))
    check_plugins_available(trt, model)
    logger = _make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except Exception as e:  # noqa: BLE001 - e.g. full TensorRT without a usable GPU
        builder, reason = None, _one_line(str(e))
    else:
        reason = _one_line(logger.errors[-1]) if logger.errors else "no error message"
    if builder is None:
        from trt_plugins._trt import backend_of

        hint = "; TensorRT-RTX builds without a GPU: --backend tensorrt-rtx" if backend_of(trt) == "tensorrt" else ""
        raise OmniMoEInputError(f"TensorRT could not create a builder ({reason}){hint}")
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(Path(model_path).resolve())):
        if parser.num_errors:
            err = parser.get_error(0)
            where = f"{err.node_operator()} node {err.node_name()!r}: " if err.node_name() else ""
            detail = f"{where}{err.desc()}"
        else:
            detail = logger.errors[0] if logger.errors else "unknown error"
        raise OmniMoEInputError(f"TensorRT could not parse {model_path}: {_one_line(detail)}")
    return ParsedNetwork(trt, logger, builder, network, parser, model, model_precision)


def token_shapes(parsed: ParsedNetwork, tokens: tuple[int, int, int]) -> dict:
    """The `--tokens` profile: the last dynamic dim of each input spans `tokens`, other dynamic
    dims are 1. {input: (min, opt, max) shapes}; empty when every input is static."""
    network = parsed.network
    shapes = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = [int(d) for d in tensor.shape]
        dynamic = [j for j, d in enumerate(dims) if d < 0]
        if not dynamic:
            continue
        per_bound = []
        for value in tokens:
            shape = list(dims)
            for j in dynamic:
                shape[j] = 1
            shape[dynamic[-1]] = value
            per_bound.append(tuple(shape))
        shapes[tensor.name] = tuple(per_bound)
    return shapes


def profiles_text(profiles: list[dict]) -> str:
    """'x (1, 1, 64)..(1, 4096, 64); ...' for the build's messages."""
    return "; ".join(", ".join(f"{n} {lo}..{hi}" for n, (lo, _, hi) in p.items()) for p in profiles) or "static shapes"


def _check_profile_names(profiles: list[dict], inputs) -> None:
    for k, shapes in enumerate(profiles):
        unknown = sorted(set(shapes) - set(inputs))
        if unknown:
            raise OmniMoEInputError(f"profile {k}: no network input named {', '.join(unknown)} (inputs: {', '.join(inputs)})")


def check_profile_inputs(model, profiles: list[dict]) -> None:
    """Every input a profile names is an input of the ONNX graph (checked before any compile)."""
    initializers = {init.name for init in model.graph.initializer}
    _check_profile_names(profiles, [i.name for i in model.graph.input if i.name not in initializers])


def check_network_profiles(parsed: ParsedNetwork, profiles: list[dict]) -> None:
    """Parsed --min/--opt/--max-shapes against the network's inputs: every dynamic input covered,
    static dims kept (one line naming the profile and input otherwise)."""
    network = parsed.network
    inputs = {network.get_input(i).name: [int(d) for d in network.get_input(i).shape] for i in range(network.num_inputs)}
    _check_profile_names(profiles, inputs)
    for k, shapes in enumerate(profiles):
        for name, dims in inputs.items():
            if name not in shapes:
                if any(d < 0 for d in dims):
                    raise OmniMoEInputError(f"profile {k}: dynamic input {name} {dims} needs --min/--opt/--max-shapes")
                continue
            for bound in shapes[name]:
                if len(bound) != len(dims) or any(d >= 0 and b != d for b, d in zip(bound, dims)):
                    raise OmniMoEInputError(f"profile {k}: input {name} has shape {dims} (-1 = dynamic), got {bound}")


def polygraphy_trt(trt):
    """polygraphy.backend.trt, driving the same TensorRT flavour as `trt` (polygraphy picks
    TensorRT or TensorRT-RTX once, when its trt backend is first imported)."""
    import sys

    import polygraphy.config as pg_config
    import trt_plugins

    rtx = trt_plugins.backend_of(trt) == "tensorrt-rtx"
    if "polygraphy.backend.trt" in sys.modules and pg_config.USE_TENSORRT_RTX != rtx:
        drives = "TensorRT-RTX" if pg_config.USE_TENSORRT_RTX else "TensorRT"
        raise OmniMoEInputError(f"polygraphy already drives {drives} in this process; build with that --backend "
                                "or in a new process")
    pg_config.USE_TENSORRT_RTX = rtx
    from polygraphy.backend import trt as pg_trt

    return pg_trt


def polygraphy_profiles(pg_trt, profiles: list[dict]) -> list:
    """polygraphy Profiles from {input: (min, opt, max)} dicts."""
    out = []
    for shapes in profiles:
        profile = pg_trt.Profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.add(name, lo, opt, hi)
        out.append(profile)
    return out


def _make_progress_monitor(trt, progress):
    class RichProgressMonitor(trt.IProgressMonitor):
        """TensorRT build phases as rich progress bars (nested phases indented)."""

        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self._tasks = {}
            self._depth = {}

        def phase_start(self, phase_name, parent_phase, num_steps):
            depth = self._depth.get(parent_phase, -1) + 1 if parent_phase else 0
            self._depth[phase_name] = depth
            self._tasks[phase_name] = progress.add_task("  " * depth + phase_name, total=max(int(num_steps), 1))

        def step_complete(self, phase_name, step):
            task = self._tasks.get(phase_name)
            if task is not None:
                progress.update(task, completed=int(step) + 1)
            return True  # keep building

        def phase_finish(self, phase_name):
            task = self._tasks.pop(phase_name, None)
            if task is not None:
                progress.remove_task(task)

    return RichProgressMonitor()


@dataclasses.dataclass
class BuildResult:
    engine: bytes
    backend: str
    backend_version: str
    precision: str
    profiles: list  # [{input: (min, opt, max) shapes}, ...], one dict per optimization profile
    io: list  # [{"name", "kind": input|output, "dtype": TensorRT type name, "shape": [-1 = dynamic, ...]}]
    plugin_layers: list  # (layer name, plugin name, attrs)
    seconds: float
    timing_cache: bytes | None = None
    notes: list = dataclasses.field(default_factory=list)

    @property
    def shapes(self) -> dict:
        """The first optimization profile ({} for static shapes)."""
        return self.profiles[0] if self.profiles else {}


def _network_io(parsed: ParsedNetwork) -> list:
    """The network's inputs and outputs: name, TensorRT data type and shape (-1 where dynamic)."""
    from trt_plugins._tensors import type_name

    network, out = parsed.network, []
    for kind, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for i in range(count):
            t = get(i)
            out.append({"name": t.name, "kind": kind, "dtype": type_name(t.dtype), "shape": [int(d) for d in t.shape]})
    return out


def _plugin_layers(parsed: ParsedNetwork) -> list:
    """(layer name, plugin name, attributes) of each plugin layer; the attributes are the ONNX
    node's (the same for Python and native plugins, whose C++ objects expose none to Python)."""
    import onnx

    nodes = {n.name: n for n in _all_nodes(parsed.model)}
    out = []
    for layer in parsed.plugin_layers():
        node = nodes.get(layer.name)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} if node is not None else {}
        attrs = {k: v.decode() if isinstance(v, bytes) else v for k, v in attrs.items()}
        out.append((layer.name, node.op_type if node is not None else "?", attrs))
    return out


def _set_timing_cache(config, path: Path | None):
    data = b""
    if path is not None and path.exists():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, False):
        raise OmniMoEInputError(f"--timing-cache {path} is not a timing cache this TensorRT can use")


def build_engine(
    model_path,
    *,
    backend: str = "auto",
    precision: str | None = None,
    tokens: tuple[int, int, int] | str = DEFAULT_TOKENS,
    timing_cache: str | os.PathLike | None = None,
    progress: bool = False,
    plugin_library: str | os.PathLike | None = None,
    profiles: list[dict] | None = None,
    workspace_limit: int | None = None,
) -> BuildResult:
    """Parse `model_path` with the omnimoe plugins and build a serialized engine (bytes).

    `plugin_library`: a native plugin library (trt_plugins.native) used instead of the Python
    plugins; it is loaded for this build only. `profiles` (parse_profiles) replace the `tokens`
    shorthand; `workspace_limit` (bytes) caps TensorRT's workspace pool, which must hold the
    plugins' workspace at every profile's maximum."""
    import trt_plugins

    if isinstance(tokens, str):
        tokens = parse_tokens(tokens)
    if precision is not None and precision not in PRECISIONS:
        raise OmniMoEInputError(f"unsupported precision {precision!r}: choose one of {PRECISIONS}")
    if plugin_library is None:
        try:  # the Python plugins size their workspaces with the kernels' helpers
            import omnimoe.kernels  # noqa: F401
        except ImportError as e:
            raise OmniMoEInputError(
                f"the Triton kernels are needed to build plugin engines ({e}): pip install 'omnimoe[triton]'"
            ) from None

    model = load_onnx_header(model_path)
    trt = trt_plugins.load(backend)
    engine_precision, strongly_typed = _precision_plan(trt, onnx_precision(model), precision)
    handle = load_plugin_library(trt, plugin_library) if plugin_library is not None else None
    if handle is not None:
        native_library_error(plugin_library, clear=True)
    try:
        plan = _BuildPlan(engine_precision, strongly_typed, tokens, profiles, workspace_limit, timing_cache, progress,
                          python_plugins=handle is None)
        return _build(trt, model_path, model, plan)
    except OmniMoEInputError:
        # The library's own message says what is wrong (TensorRT's only says a plugin failed).
        reason = native_library_error(plugin_library) if handle is not None else ""
        if reason:
            raise OmniMoEInputError(f"TensorRT failed to build an engine from {model_path}: {_one_line(reason)}") from None
        raise
    finally:
        if handle is not None:
            # Unloaded again: a later Python-plugin build in this process must not pick it up.
            trt.get_plugin_registry().deregister_library(handle)


@dataclasses.dataclass
class _BuildPlan:
    precision: str
    strongly_typed: bool
    tokens: tuple
    profiles: list | None
    workspace_limit: int | None
    timing_cache: object
    progress: bool
    python_plugins: bool


def _build(trt, model_path, model, plan: _BuildPlan):
    """Parse with our logger (one-line parser and builder errors), then polygraphy's loaders:
    CreateConfig (profiles, precision flags, memory pools, progress monitor) and
    engine_bytes_from_network."""
    import trt_plugins
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    pg_trt = polygraphy_trt(trt)
    engine_precision, progress = plan.precision, plan.progress
    parsed = parse_network(model_path, strongly_typed=plan.strongly_typed, trt=trt, model=model,
                           python_plugins=plan.python_plugins)
    if plan.profiles:
        check_network_profiles(parsed, plan.profiles)
        all_shapes = plan.profiles
    else:
        shapes = token_shapes(parsed, plan.tokens)
        all_shapes = [shapes] if shapes else []
    if plan.workspace_limit is not None:
        need, tokens = plugin_workspace_bytes(model, all_shapes)
        if need > plan.workspace_limit:
            raise OmniMoEInputError(
                f"--mem-pool-size workspace of {plan.workspace_limit} bytes is too small: the omnimoe plugins need "
                f"{need} bytes ({need / 2**20:.2f} MiB) of workspace at {tokens} tokens, the profiles' maximum"
            )
    span = profiles_text(all_shapes)
    cache_path = Path(plan.timing_cache) if plan.timing_cache else None
    notes = []
    if cache_path is not None and trt_plugins.backend_of(trt) == "tensorrt-rtx":
        # TensorRT-RTX does no build-time tactic timing (its timing-cache calls are no-ops).
        notes.append(f"TensorRT-RTX has no build-time timing cache; --timing-cache {cache_path} left untouched")
        cache_path = None

    configs = []  # the config polygraphy created, for the timing cache afterwards

    def build(monitor=None):
        lowered = not plan.strongly_typed
        config_args = dict(
            fp16=lowered and engine_precision == "fp16",
            bf16=lowered and engine_precision == "bf16",
            profiles=polygraphy_profiles(pg_trt, all_shapes) or None,
            memory_pool_limits=(None if plan.workspace_limit is None
                                else {trt.MemoryPoolType.WORKSPACE: plan.workspace_limit}),
            progress_monitor=monitor,
        )

        def config_for(builder, network):
            config = pg_trt.CreateConfig(**config_args)(builder, network)
            if cache_path is not None:
                _set_timing_cache(config, cache_path)
            configs.append(config)
            return config

        try:
            # polygraphy's own log lines stay quiet; its failure becomes our one-line message.
            with G_LOGGER.verbosity(G_LOGGER.CRITICAL + 1):
                return pg_trt.engine_bytes_from_network((parsed.builder, parsed.network), config=config_for)
        except PolygraphyException as e:
            detail = parsed.logger.errors[-1] if parsed.logger.errors else str(e)
            raise OmniMoEInputError(
                f"TensorRT failed to build an engine from {model_path}: {_one_line(detail)}") from None

    start = time.perf_counter()
    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        console.print(
            f"building {model_path} with {trt_plugins.backend_of(trt)} {trt.__version__} "
            f"({engine_precision}; {span}) ...",
            highlight=False,
            soft_wrap=True,
        )
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as bars:
            serialized = build(_make_progress_monitor(trt, bars))
    else:
        serialized = build()
    seconds = time.perf_counter() - start

    cache_bytes = None
    if cache_path is not None:
        cache_bytes = bytes(memoryview(configs[-1].get_timing_cache().serialize()))
    return BuildResult(
        engine=bytes(memoryview(serialized)),
        backend=trt_plugins.backend_of(trt),
        backend_version=str(trt.__version__),
        precision=engine_precision,
        profiles=all_shapes,
        plugin_layers=_plugin_layers(parsed),
        io=_network_io(parsed),
        seconds=seconds,
        timing_cache=cache_bytes,
        notes=notes,
    )


def sidecar_path(engine: Path) -> Path:
    """Where `omnimoe build` records what the engine holds (read by `omnimoe inspect`)."""
    return engine.with_name(engine.name + ".json")


def engine_plugin_library(engine: Path) -> Path | None:
    """The native plugin library an engine was built with (from its sidecar; else a library
    beside an engine without sidecar), or None for Python-plugin engines."""
    import json

    from trt_plugins.native import LIBRARY_NAME

    engine = Path(engine)
    meta_path = sidecar_path(engine)
    if meta_path.is_file():
        try:
            name = json.loads(meta_path.read_text()).get("plugin_library")
        except (ValueError, AttributeError):
            raise OmniMoEInputError(f"{meta_path}: not the JSON `omnimoe build` writes") from None
        return engine.with_name(name) if name else None
    beside = engine.with_name(LIBRARY_NAME)
    return beside if beside.is_file() else None


def _sibling_variants(directory: Path, engine: Path) -> list:
    """Kernel variants of the other engines in `directory` that use the library there: the new
    library keeps them, so building a second engine beside the first never breaks the first."""
    import json

    from trt_plugins import native

    kinds = {"OmniProductKeyTopK": native.TopKVariant, "OmniExpertGroupedMatMul": native.ExpertsVariant}
    out = []
    for meta_path in sorted(directory.glob("*.json")):
        if meta_path == sidecar_path(engine) or not meta_path.with_suffix("").is_file():
            continue
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("plugin_library") != native.LIBRARY_NAME:
                continue
            for v in meta.get("native", {}).get("variants", []):
                v = dict(v)
                out.append(kinds[v.pop("op")](**v))
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            continue  # not one of ours
    return out


def run(args) -> int:
    import json
    import sys

    import omnimoe
    from omnimoe.atomic import atomic_files, check_output

    tokens = parse_tokens(args.tokens)  # before any heavy import: a bad range fails fast
    profiles = parse_profiles(args.min_shapes, args.opt_shapes, args.max_shapes)
    workspace_limit = parse_mem_pool(args.mem_pool_size)
    output = Path(args.output)
    model_files = [args.model, f"{args.model}.data"]
    check_output(output, inputs=[*model_files, args.timing_cache], what="engine")  # the output policy, before any work
    if args.timing_cache:
        check_output(args.timing_cache, inputs=[*model_files, output], what="timing cache")
    native_build = args.plugins == "native"
    outputs = [output, sidecar_path(output)]
    if native_build:
        import trt_plugins
        from export.schemas import DOMAIN, OPS
        from trt_plugins import native

        sms = native.parse_sms(args.sm)
        # The checks the engine build would make, before any kernel is compiled.
        model = load_onnx_header(args.model)
        trt = trt_plugins.load(args.backend)
        _precision_plan(trt, onnx_precision(model), args.precision)
        check_plugins_available(trt, model, registered={(op.op_type, DOMAIN) for op in OPS})
        check_profile_inputs(model, profiles)
        variants = native.variants_from_onnx(model)
        native_build = bool(variants)  # e.g. the standard-op twin: no plugins, no library
    if native_build:
        outputs += [output.with_name(native.LIBRARY_NAME), output.with_name(native.SOURCE_NAME)]
        for extra in outputs[1:]:
            check_output(extra, inputs=model_files, what="plugin library")
        # Compiler and headers: a missing toolchain is one line before any work.
        native.library.find_compiler()
        native.library.find_trt_include(args.trt_include)
        native.library.find_cuda_include(args.cuda_include)
    console = None
    if not args.no_progress:
        from rich.console import Console

        console = Console(stderr=True)
    with atomic_files(outputs) as tmps:
        library = None
        if native_build:
            kept = [v for v in _sibling_variants(output.parent, output) if v not in variants]
            if console:
                console.print(
                    f"compiling the native plugin library for sm {','.join(map(str, sms))} "
                    f"({len(variants)} kernel variants of this model"
                    + (f", {len(kept)} kept for the other engines beside it" if kept else "") + ") ...",
                    highlight=False, soft_wrap=True,
                )
            library = native.build_library(
                variants + kept, tmps[2], sms=sms, trt_include=args.trt_include, cuda_include=args.cuda_include,
                source=tmps[3],
            )
        result = build_engine(
            args.model,
            backend=args.backend,
            precision=args.precision,
            tokens=tokens,
            timing_cache=args.timing_cache,
            progress=not args.no_progress,
            plugin_library=tmps[2] if library else None,
            profiles=profiles,
            workspace_limit=workspace_limit,
        )
        tmps[0].write_bytes(result.engine)
        meta = {
            "omnimoe_version": omnimoe.__version__,
            "onnx": str(args.model),
            "backend": result.backend,
            "backend_version": result.backend_version,
            "precision": result.precision,
            "io": result.io,
            "profiles": [{name: [list(b) for b in bounds] for name, bounds in p.items()} for p in result.profiles],
            "plugins": args.plugins if result.plugin_layers else None,
            "plugin_library": native.LIBRARY_NAME if library else None,
            "sms": library.info["sms"] if library else None,
            "plugin_layers": [{"name": n, "plugin": p, "attributes": a} for n, p, a in result.plugin_layers],
            "native": library.info if library else None,
        }
        tmps[1].write_text(json.dumps(meta, indent=2) + "\n")
    for note in result.notes:
        sys.stderr.write(f"omnimoe build: note: {note}\n")
    if args.timing_cache and result.timing_cache is not None:
        with atomic_files([args.timing_cache]) as (tmp,):
            tmp.write_bytes(result.timing_cache)
    profile = profiles_text(result.profiles)
    plugins = ", ".join(sorted({p for _, p, _ in result.plugin_layers})) or "no plugins"
    sys.stdout.write(
        f"wrote {output} ({len(result.engine) / 2**20:.2f} MiB; {result.backend}, {result.precision}; "
        f"{profile}; {len(result.plugin_layers)} plugin layers: {plugins}; built in {result.seconds:.1f}s)\n"
    )
    if library:
        lib_path = outputs[2]
        sizes = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in library.info["kernel_bytes"].items())
        sys.stdout.write(
            f"wrote {lib_path} (native plugins, {lib_path.stat().st_size / 2**20:.2f} MiB; "
            f"kernels: {sizes}; AOT {library.seconds_compile_kernels:.1f}s + C++ {library.seconds_compile_cpp:.1f}s)\n"
            f"run it without Python: trtexec --loadEngine={output} --dynamicPlugins={lib_path}\n"
        )
    elif result.plugin_layers:
        sys.stdout.write("python plugins: the process that runs this engine must `import trt_plugins; trt_plugins.register()`\n")
    return 0

