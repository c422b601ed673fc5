"""Build libomnimoe_trt_plugins.so for one ONNX model: variants -> AOT kernels -> C++ -> g++.

    from trt_plugins import native
    variants = native.variants_from_onnx("layer.onnx")
    result = native.build_library(variants, "out/libomnimoe_trt_plugins.so", sms=(87, 90))

The library holds the kernels of exactly the variants the model's omnimoe nodes need. Headers:
TensorRT's from `trt_include` / $TENSORRT_INCLUDE_DIR / the SDK's usual places / the
`kernel-lens` wheel's copy; CUDA's `cuda.h` from `cuda_include` / $CUDA_HOME / /usr/local/cuda /
the triton wheel's copy. The generated source is kept beside the library (`.cpp`) so a Jetson can
compile it natively with the one command in `compile_command`.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import subprocess
from pathlib import Path

from omnimoe.errors import OmniMoEInputError

from . import aot, codegen

LIBRARY_NAME = "libomnimoe_trt_plugins.so"
SOURCE_NAME = "omnimoe_trt_plugins.cpp"
_FALLBACK_HINT = "or build with `--plugins python`"


def _arch_dir() -> str:
    return f"{platform.machine()}-linux-gnu"


def find_trt_include(explicit: str | None = None) -> Path:
    """A directory holding NvInferRuntime.h (TensorRT 10.x headers)."""
    given = explicit or os.environ.get("TENSORRT_INCLUDE_DIR")
    if given:
        chosen = Path(given)
        if not (chosen / "NvInferRuntime.h").is_file():
            raise OmniMoEInputError(f"no NvInferRuntime.h in TensorRT include dir {chosen}")
        return chosen
    candidates = [f"/usr/include/{_arch_dir()}", "/usr/include", "/usr/local/tensorrt/include", "/opt/tensorrt/include"]
    try:
        import kernel_lens

        candidates.append(str(Path(kernel_lens.__file__).parent / "include" / "tensorrt"))
    except ImportError:
        pass
    for c in candidates:
        if (Path(c) / "NvInferRuntime.h").is_file():
            return Path(c)
    raise OmniMoEInputError(
        "TensorRT headers (NvInferRuntime.h) not found: install the TensorRT SDK headers or `pip install kernel-lens`, "
        f"pass --trt-include DIR / set TENSORRT_INCLUDE_DIR, {_FALLBACK_HINT}"
    )


def find_cuda_include(explicit: str | None = None) -> Path:
    """A directory holding the CUDA driver API header cuda.h."""
    if explicit:
        if not (Path(explicit) / "cuda.h").is_file():
            raise OmniMoEInputError(f"no cuda.h in CUDA include dir {explicit}")
        return Path(explicit)
    candidates = [
        os.path.join(os.environ[v], "include") for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)
    ] + ["/usr/local/cuda/include", f"/usr/include/{_arch_dir()}", "/usr/include"]
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "include"))
    except ImportError:
        pass
    for c in candidates:
        # cuda.h for the driver API, cuda_runtime_api.h for TensorRT's own headers.
        if (Path(c) / "cuda.h").is_file() and (Path(c) / "cuda_runtime_api.h").is_file():
            return Path(c)
    raise OmniMoEInputError(f"CUDA header cuda.h not found: install the CUDA toolkit or set CUDA_HOME, {_FALLBACK_HINT}")


def find_compiler() -> str:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise OmniMoEInputError(f"no C++ compiler (g++) found: install g++ (e.g. apt install g++), {_FALLBACK_HINT}")


def compile_command(source, output, trt_include, cuda_include, compiler: str = "g++") -> list[str]:
    return [
        str(compiler), "-std=c++17", "-O2", "-shared", "-fPIC", "-Wno-deprecated-declarations",
        f"-I{trt_include}", f"-I{cuda_include}", str(source), "-o", str(output), "-ldl",
    ]


# ------------------------------------------------------------------------------------------------
# Which variants a model needs (from the ONNX graph, no weights loaded)
# ------------------------------------------------------------------------------------------------
_ONNX_FLOAT = {1: "fp32", 10: "fp16", 16: "bf16"}


def variants_from_onnx(model) -> list:
    """TopKVariant / ExpertsVariant for every omnimoe node of `model` (a path or ModelProto)."""
    import onnx

    from export.schemas import DOMAIN, EXPERT_GROUPED_MATMUL, PRODUCT_KEY_TOPK

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    nodes = [n for n in model.graph.node if n.domain == DOMAIN]
    for f in model.functions:
        if any(n.domain == DOMAIN for n in f.node):
            raise OmniMoEInputError("omnimoe nodes inside ONNX local functions are not supported by the native plugins")
    strict_error = None
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types; the last line says what is wrong
        # Kept for when a shape the kernels need stays unknown (e.g. weights in external data that
        # inference could not read make strict mode fail on a consistent model).
        strict_error = (str(e).strip().splitlines() or [type(e).__name__])[-1].strip()
        inferred = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, tuple] = {}
    for init in model.graph.initializer:
        shapes[init.name] = (tuple(init.dims), init.data_type)
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if vi.name not in shapes and tt.HasField("shape"):
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            shapes[vi.name] = (dims, tt.elem_type)

    def attr(node, name):
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        raise OmniMoEInputError(f"{node.op_type} node {node.name!r} has no {name!r} attribute")

    def dim(tensor, axis, what, node):
        dims, _ = shapes.get(tensor, ((), 0))
        if (len(dims) <= axis or dims[axis] <= 0) and strict_error:
            raise OmniMoEInputError(f"the ONNX model's shapes are inconsistent ({strict_error})")
        if len(dims) <= axis or dims[axis] <= 0:
            raise OmniMoEInputError(
                f"{node.op_type} node {node.name!r}: the {what} of {tensor!r} is not static in the ONNX model "
                "(the native plugins compile kernels for it)"
            )
        return int(dims[axis])

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    variants = []
    for node in nodes:
        if node.op_type == PRODUCT_KEY_TOPK.op_type:
            v = aot.TopKVariant(dim(node.input[0], 1, "grid side s", node), int(attr(node, "top_k")), text(attr(node, "gate")))
            if not 1 <= v.top_k <= min(v.grid_side**2, 4096):
                raise OmniMoEInputError(
                    f"{node.op_type} node {node.name!r}: top_k={v.top_k} must be in 1..min(N = s*s = {v.grid_side**2}, 4096)"
                )
            variants.append(v)
        elif node.op_type == EXPERT_GROUPED_MATMUL.op_type:
            _, elem = shapes.get(node.input[1], ((), 0))
            if elem not in _ONNX_FLOAT:
                raise OmniMoEInputError(f"{node.op_type} node {node.name!r}: expert tables must be float32/float16/bfloat16")
            variants.append(
                aot.ExpertsVariant(
                    hidden_size=dim(node.input[1], 1, "hidden size d", node),
                    num_experts=dim(node.input[1], 0, "number of experts N", node),
                    top_k=dim(node.input[3], 1, "top_k", node) if node.input[3] in shapes else _paired_top_k(nodes, node, attr),
                    dtype=_ONNX_FLOAT[elem],
                    activation=text(attr(node, "activation")),
                )
            )
        else:
            raise OmniMoEInputError(f"unknown op {DOMAIN}::{node.op_type} (node {node.name!r})")
    return list(dict.fromkeys(variants))


def _paired_top_k(nodes, node, attr) -> int:
    """K of the top-K node whose outputs feed this experts node (when shapes were not inferred)."""
    for other in nodes:
        if node.input[3] in other.output:
            return int(attr(other, "top_k"))
    raise OmniMoEInputError(f"{node.op_type} node {node.name!r}: cannot tell top_k from the graph")


# ------------------------------------------------------------------------------------------------
# Build
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class NativeLibrary:
    path: Path  # the .so
    source: Path  # the generated .cpp beside it
    info: dict  # SMs, variants, versions, kernel bytes per SM
    command: list  # the compile command that produced it
    seconds_compile_kernels: float
    seconds_compile_cpp: float


def build_library(
    variants,
    output,
    *,
    sms=aot.DEFAULT_SMS,
    trt_include: str | None = None,
    cuda_include: str | None = None,
    source=None,
    log=None,
) -> NativeLibrary:
    """AOT-compile `variants` for `sms` and compile the plugin library to `output`, with the
    generated source at `source` (default: SOURCE_NAME beside it). Callers that need the two files
    to appear atomically pass temporary paths (omnimoe build does)."""
    import time

    if not variants:
        raise OmniMoEInputError("the model has no omnimoe nodes: it needs no plugin library")
    compiler = find_compiler()
    trt_dir, cuda_dir = find_trt_include(trt_include), find_cuda_include(cuda_include)
    output = Path(output)
    source = Path(source) if source is not None else output.with_name(SOURCE_NAME)
    t0 = time.perf_counter()
    library = aot.compile_variants(variants, sms, log=log)
    t1 = time.perf_counter()
    source_text = codegen.render(library)
    output.parent.mkdir(parents=True, exist_ok=True)
    source.write_text(source_text)
    cmd = compile_command(source, output, trt_dir, cuda_dir, compiler)
    if log:
        log(f"compiling {output.name} with {Path(compiler).name} ({len(source_text) / 2**20:.1f} MiB of C++)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        first = next((ln for ln in proc.stderr.splitlines() if "error" in ln), proc.stderr.strip()[:300])
        raise OmniMoEInputError(f"the C++ plugin library failed to compile: {first}")
    t2 = time.perf_counter()
    final_cmd = compile_command(SOURCE_NAME, LIBRARY_NAME, trt_dir, cuda_dir, Path(compiler).name)
    return NativeLibrary(output, source, codegen.info(library), final_cmd, t1 - t0, t2 - t1)
