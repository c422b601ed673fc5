"""The native plugin library on CPU (issue 10): it compiles from a clean clone, and engines build
with it in a process that holds nothing but TensorRT-RTX and the `.so`.

What the GPU runs (launches, enqueue, CUDA graphs, SM fallback) is in test_native_plugins_gpu.py;
here the experts' schedule choice, workspace size and launch sequences (memsets, kernels, grids,
arguments; a logging stand-in for libcuda) are compared with the Python launchers'.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest
import torch

from export.schemas import DOMAIN, OPS, OPSET_VERSION
from omnimoe.errors import OmniMoEInputError

trt_plugins = pytest.importorskip("trt_plugins")
try:
    trt_plugins.resolve_backend("tensorrt-rtx")
except OmniMoEInputError:
    pytest.skip("TensorRT-RTX is not installed", allow_module_level=True)
if shutil.which("g++") is None:
    pytest.skip("no g++ on this machine", allow_module_level=True)

from test_trt_build import _small_layer, _small_lm, make_plugin_graph  # noqa: E402

from deploy import build as build_mod  # noqa: E402
from deploy.cli import main as cli_main  # noqa: E402
from omnimoe.kernels import expert_workspace_bytes, topk_workspace_bytes  # noqa: E402
from omnimoe.kernels.experts import pairs_workspace_bytes  # noqa: E402
from trt_plugins import native  # noqa: E402
from trt_plugins.native import codegen  # noqa: E402

RTX = "tensorrt-rtx"
SMS = "87,90"  # two cubins + the PTX fallback keep these tests quick; the CLI test covers the default


def _cli(argv) -> int:
    try:
        return cli_main([str(a) for a in argv])
    except SystemExit as e:
        return int(e.code)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Plugin graphs of a layer (fp32, fp16, bf16; gelu, K=6 <= s=8) and of TinyOmniLM."""
    from export.onnx_export import export_onnx

    directory = tmp_path_factory.mktemp("native_models")
    axes = ({0: "batch", 1: "seq"},)
    paths = {}
    layer = _small_layer(act="gelu")
    for dt in ("fp32", "fp16", "bf16"):
        paths[f"layer-{dt}"] = directory / f"layer-{dt}.onnx"
        export_onnx(layer, paths[f"layer-{dt}"], example_inputs=(torch.zeros(2, 3, 32),), ops="plugin", dtype=dt,
                    input_names=["x"], output_names=["y"], dynamic_shapes=axes)
    lm = _small_lm()
    for dt in ("fp32", "fp16", "bf16"):
        paths["lm" if dt == "fp32" else f"lm-{dt}"] = path = directory / f"lm-{dt}.onnx"
        export_onnx(lm, path, example_inputs=(torch.zeros(2, 3, dtype=torch.long),), ops="plugin", dtype=dt,
                    input_names=["input_ids"], output_names=["logits"], dynamic_shapes=axes)
    return paths


@pytest.fixture(scope="module")
def library(models, tmp_path_factory):
    """One library for every model above, as `omnimoe build` makes it."""
    variants = []
    for path in models.values():
        variants += [v for v in native.variants_from_onnx(path) if v not in variants]
    out = tmp_path_factory.mktemp("native_lib") / native.LIBRARY_NAME
    return native.build_library(variants, out, sms=native.parse_sms(SMS))


def test_variants_from_the_onnx_graph(models):
    assert native.variants_from_onnx(models["layer-bf16"]) == [
        native.TopKVariant(8, 6, "softmax"), native.ExpertsVariant(32, 64, 6, "bf16", "gelu")]
    lm = native.variants_from_onnx(models["lm"])
    assert {type(v) for v in lm} == {native.TopKVariant, native.ExpertsVariant}


def test_library_has_no_python_torch_or_triton_dependency(library):
    assert library.path.is_file() and library.source.is_file()
    deps = subprocess.run(["ldd", str(library.path)], capture_output=True, text=True, check=True).stdout
    for forbidden in ("python", "torch", "triton", "nvinfer", "tensorrt", "libcuda"):
        assert forbidden not in deps, deps
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library.path)], capture_output=True, text=True).stdout
    assert "getCreators" in symbols and "setLoggerFinder" in symbols
    info = library.info
    assert info["sms"] == [87, 90] and set(info["kernel_bytes"]) == {"sm_87", "sm_90", "ptx_sm_80"}
    assert all(size > 10_000 for size in info["kernel_bytes"].values())


# (K, N, d) of the experts' workspace and schedule checks: non-square N; square N where the grid-row
# schedule is reachable (T*K >= 20 N from GRID_ROW_MIN_TOKENS tokens on, below its int32 limit) and
# where it is not (N = 1024^2 at K = 16 needs more tokens than its keys allow).
EXPERT_SHAPES = ((6, 64, 32), (6, 65, 32), (16, 1_048_576, 1024), (512, 102_400, 1024), (4096, 102_400, 1024),
                 (128, 4096, 128), (100, 144, 64), (20, 36, 64), (8, 256, 64), (1000, 81 * 81, 96),
                 (65, 1089, 48), (4096, 4, 24), (1, 4, 100), (300, 1 << 20, 128))


def test_workspace_sizes_match_the_python_plugins(library):
    lib = native.NativeLib(library.path)
    for T in (1, 7, 255, 256, 300, 4096, 70_000, 600_000):
        for s, K in ((8, 6), (16, 64), (16, 65), (12, 100), (1024, 4096)):
            assert lib.topk_workspace_bytes(T, s, K) == topk_workspace_bytes(T, s, K)
        for K, N, d in EXPERT_SHAPES:
            # The native library runs what "auto" runs, grid-row schedule included: the same workspace.
            assert lib.experts_workspace_bytes(T, K, N, d) == expert_workspace_bytes(T, K, N, d), (T, K, N, d)
    # The grid covers shapes where the grid-row schedule sets the size.
    assert expert_workspace_bytes(4096, 128, 4096, 128) > pairs_workspace_bytes(4096, 128, 4096, 128)
    assert expert_workspace_bytes(70_000, 512, 102_400, 1024) > pairs_workspace_bytes(70_000, 512, 102_400, 1024)


def _python_schedule(T, K, N) -> str:
    from omnimoe.kernels.experts import EXPERT_CENTRIC_SCHEDULE, use_expert_centric, use_grid_row

    if use_grid_row(T, K, N):
        return "grid"
    return EXPERT_CENTRIC_SCHEDULE if use_expert_centric(T, K, N) else "token"


def test_schedule_choice_matches_the_python_launcher(library):
    """omnimoe_native_experts_schedule (what enqueue runs) == expert_grouped_matmul_triton's "auto"
    over token counts around every threshold: the token minimums, T*K = reuse * N, and the grid
    schedule's int32 token limit."""
    import math

    from omnimoe.kernels import experts, grid_row

    lib = native.NativeLib(library.path)
    seen = set()
    # 1600^2 is the largest grid whose s*P panels per direction fit the line-count histograms.
    for K, N, _ in EXPERT_SHAPES + ((2, 9, 8), (3, 100, 8), (50, 1000, 8), (64, 4096, 8), (4096, 1 << 20, 8),
                                    (4096, 1600**2, 8), (4096, 1601**2, 8)):
        reuse_t = math.ceil(experts.EXPERT_CENTRIC_MIN_REUSE * N / K)
        limit = grid_row.max_tokens(K, N)
        ts = {1, 2, 64, 65, 66, 255, 256, 257, 300, 1024, 4096, 70_000, 2**31 // max(K, 1) + 1}
        for t0 in (experts.EXPERT_CENTRIC_MIN_TOKENS, experts.GRID_ROW_MIN_TOKENS, reuse_t, limit):
            ts |= {t0 - 1, t0, t0 + 1}
        for T in sorted(t for t in ts if t >= 1):
            want = _python_schedule(T, K, N)
            got = native.capi.SCHEDULES[lib.experts_schedule(T, K, N)]
            assert got == want, (T, K, N)
            seen.add(want)
    assert seen == {"token", "hybrid", "grid"}


def test_grid_kernels_are_compiled_where_auto_can_pick_the_grid_schedule():
    from omnimoe.kernels import grid_row

    for K, N, d in EXPERT_SHAPES:
        for dtype in ("fp32", "bf16"):
            specs = {s.role: s for s in native.aot.kernel_specs(native.ExpertsVariant(d, N, K, dtype, "silu"))}
            grid = {r for r in specs if r.startswith("gr_")}
            if not native.aot.grid_reachable(K, N):
                assert not grid
                continue
            assert grid == {"gr_line_count", "gr_histogram", "gr_scan_blocks", "gr_scatter", "gr_blocks", "gr_panel"} | (
                set() if dtype == "fp32" else {"gr_cast"})
            # The panel kernel as grid_row.launch runs it: constexprs, warps and stages of panel_config.
            cfg = dict(grid_row.panel_config(N, dtype == "fp32", 0))
            panel = specs["gr_panel"]
            assert panel.num_warps == cfg.pop("num_warps") and panel.num_stages == cfg.pop("num_stages")
            assert dict(panel.constexprs) == cfg
            assert dict(specs["gr_blocks"].constexprs)["BM"] == cfg["BM"]


_STANDALONE = textwrap.dedent(
    """
    import json, sys
    import tensorrt_rtx as trt

    library, results = sys.argv[1], []
    logger = trt.Logger(trt.Logger.ERROR)
    registry = trt.get_plugin_registry()
    assert registry.load_library(library) is not None
    creators = {c.name: c for c in registry.all_creators if c.plugin_namespace == "omnimoe"}
    contract = {name: [c.plugin_version, [(f.name, str(f.type)) for f in c.field_names]] for name, c in creators.items()}
    for onnx_path, token_input in zip(sys.argv[2::2], sys.argv[3::2]):
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(onnx_path)
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        plugin_layers = sum(network.get_layer(i).type == trt.LayerType.PLUGIN_V3 for i in range(network.num_layers))
        config = builder.create_builder_config()
        profile = builder.create_optimization_profile()
        x = network.get_input(0)
        dims = [int(d) for d in x.shape]
        lo, hi = [1 if d < 0 else d for d in dims], [1 if d < 0 else d for d in dims]
        hi[-1 if token_input == "ids" else -2] = 64
        profile.set_shape(x.name, lo, lo, hi)
        config.add_optimization_profile(profile)
        engine = builder.build_serialized_network(network, config) if ok else None
        results.append({"onnx": onnx_path, "parsed": ok, "errors": errors, "plugin_layers": plugin_layers,
                        "engine_bytes": 0 if engine is None else len(bytes(memoryview(engine)))})
    leaked = [m for m in ("torch", "triton", "omnimoe", "trt_plugins", "deploy", "export") if m in sys.modules]
    print(json.dumps({"results": results, "leaked": leaked, "contract": contract}))
    """
)


def test_engines_build_in_a_process_with_only_tensorrt_and_the_library(models, library, tmp_path):
    trt_plugins.load(RTX)  # the wheel's libtensorrt_rtx.so link (SPEC §4), made once here
    script = tmp_path / "standalone.py"
    script.write_text(_STANDALONE)
    argv = [sys.executable, str(script), str(library.path)]
    for name in ("layer-fp32", "layer-fp16", "layer-bf16", "lm", "lm-fp16", "lm-bf16"):
        argv += [str(models[name]), "ids" if name == "lm" else "x"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["leaked"] == []
    for r in report["results"]:
        assert r["parsed"] and not r["errors"], r
        assert r["plugin_layers"] >= 2 and r["engine_bytes"] > 10_000, r
    # The library's creators carry exactly the declared identity and fields.
    for op in OPS:
        version, fields = report["contract"][op.op_type]
        assert version == str(OPSET_VERSION)
        assert fields == [[a.name, "PluginFieldType.INT32" if a.kind == "int" else "PluginFieldType.CHAR"]
                          for a in op.attributes]


def test_a_library_without_the_models_kernels_fails_the_build_clearly(library, tmp_path):
    other = make_plugin_graph(tmp_path / "other.onnx", s=4, d=8, top_k=3)  # variants the library does not hold
    with pytest.raises(OmniMoEInputError, match="no kernel compiled for"):
        build_mod.build_engine(other, backend=RTX, tokens="1:8:16", plugin_library=library.path)
    # A later failure of another kind is not blamed on that message.
    bad = make_plugin_graph(tmp_path / "bad.onnx", s=8, d=32, top_k=6, gate="softmax", activation="gelu")
    with pytest.raises(OmniMoEInputError) as failure:
        build_mod.build_engine(bad, backend=RTX, tokens="1:8:16", plugin_library=library.path,
                               profiles=[{"nope": ((1, 32), (1, 32), (1, 32))}])
    assert "no kernel compiled" not in str(failure.value) and "nope" in str(failure.value)
    # The library is unloaded again: the same process still builds with the Python plugins.
    result = build_mod.build_engine(other, backend=RTX, tokens="1:8:16")
    assert len(result.engine) > 1000


def test_runtime_plugins_without_a_gpu_say_why(library):
    """The deserialization path (runtime-phase creation) needs the CUDA driver to pick kernels for
    the GPU; without one it refuses with a clear message instead of crashing."""
    lib = native.NativeLib(library.path)
    rc = lib.harness_topk(6, b"softmax", 4, 8, None, None, None, None, None, None)
    if rc == 1 and "CUDA driver" in lib.error():
        return  # this machine has no libcuda: the expected refusal
    pytest.skip("a CUDA driver is present; the GPU tests cover the runtime path")


def test_bad_fields_are_refused_by_the_creator(library):
    trt = trt_plugins.load(RTX)
    handle = build_mod.load_plugin_library(trt, library.path)
    try:
        creator = trt.get_plugin_registry().get_creator("OmniProductKeyTopK", "1", DOMAIN)
        from trt_fields import plugin_fields

        good = creator.create_plugin("ok", plugin_fields(trt, top_k=4, gate="product"), trt.TensorRTPhase.BUILD)
        assert good is not None
        for bad in (dict(top_k=4, gate="bogus"), dict(top_k=0, gate="product"), dict(gate="product")):
            try:
                plugin = creator.create_plugin("bad", plugin_fields(trt, **bad), trt.TensorRTPhase.BUILD)
            except Exception:  # noqa: BLE001 - some bindings raise on a null plugin
                plugin = None
            assert plugin is None, bad
    finally:
        trt.get_plugin_registry().deregister_library(handle)
    trt_plugins.register(trt)


def test_cli_native_build_writes_engine_library_and_sidecar(models, tmp_path, capsys):
    engine = tmp_path / "out" / "layer.engine"
    assert _cli(["build", models["layer-bf16"], "-o", engine, "--backend", RTX, "--sm", SMS, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {engine}" in out and f"wrote {engine.with_name(native.LIBRARY_NAME)}" in out and "sm_90" in out
    meta = json.loads((tmp_path / "out" / "layer.engine.json").read_text())
    assert meta["plugins"] == "native" and meta["plugin_library"] == native.LIBRARY_NAME and meta["sms"] == [87, 90]
    assert meta["precision"] == "bf16" and [io["name"] for io in meta["io"]] == ["x", "y"]
    assert build_mod.engine_plugin_library(engine) == engine.with_name(native.LIBRARY_NAME)

    # A second engine beside it: the rebuilt library keeps the first engine's kernels too.
    lm_engine = tmp_path / "out" / "lm.engine"
    assert _cli(["build", models["lm"], "-o", lm_engine, "--backend", RTX, "--sm", SMS, "--no-progress",
                 "--tokens", "1:8:32"]) == 0
    lib = native.NativeLib(engine.with_name(native.LIBRARY_NAME))
    held = {json.dumps(v, sort_keys=True) for v in lib.info()["variants"]}
    for v in meta["native"]["variants"]:
        assert json.dumps(v, sort_keys=True) in held

    python_engine = tmp_path / "py" / "layer.engine"
    assert _cli(["build", models["layer-fp32"], "-o", python_engine, "--backend", RTX, "--plugins", "python",
                 "--no-progress"]) == 0
    assert sorted(p.name for p in python_engine.parent.iterdir()) == ["layer.engine", "layer.engine.json"]
    assert build_mod.engine_plugin_library(python_engine) is None


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--sm", "101"], "--sm 101 is not supported"),
        (["--sm", "x86"], "--sm takes compute capabilities"),
        (["--trt-include", "/nonexistent"], "no NvInferRuntime.h"),
        (["--cuda-include", "/nonexistent"], "no cuda.h"),
    ],
)
def test_cli_native_bad_input_is_one_line(models, tmp_path, capsys, extra, needle):
    engine = tmp_path / "e.engine"
    assert _cli(["build", models["layer-fp32"], "-o", engine, "--backend", RTX, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert list(tmp_path.iterdir()) == []


def test_cli_without_a_compiler_says_what_to_install(models, tmp_path, capsys, monkeypatch):
    empty = tmp_path / "bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert _cli(["build", models["layer-fp32"], "-o", tmp_path / "e.engine", "--backend", RTX]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "g++" in err and "--plugins python" in err, err


def test_default_sms_are_supported_and_are_the_cli_default():
    from deploy.cli import build_parser

    assert set(native.DEFAULT_SMS) <= set(native.SUPPORTED_SMS)
    args = build_parser().parse_args(["build", "m.onnx", "-o", "m.engine"])
    assert native.parse_sms(args.sm) == native.DEFAULT_SMS


def test_generated_source_restates_no_contract_by_hand():
    """plugins.cpp names no op, field or constant itself: they all come from the generated half."""
    text = codegen.HANDWRITTEN.read_text()
    for op in OPS:
        assert op.op_type not in text
        for a in op.attributes:
            assert f'"{a.name}"' not in text
    assert f'"{DOMAIN}"' not in text
    assert text.count(codegen.MARKER) == 1


_DLOPEN_HOST = textwrap.dedent(
    """
    import ctypes, os, sys
    fake, library = sys.argv[1], sys.argv[2]
    nvinfer = ctypes.CDLL(fake, mode=os.RTLD_NOW | os.RTLD_LOCAL)   # the host's TensorRT, loaded first
    nvinfer.fake_registry_log.restype = ctypes.c_char_p
    lib = ctypes.CDLL(library, mode=os.RTLD_NOW | os.RTLD_LOCAL)     # a plain dlopen, as Triton server does
    print(nvinfer.fake_registry_log().decode(), end="")
    print("-- loadLibrary calls getCreators --")
    n = ctypes.c_int32(0)
    lib.getCreators.restype = ctypes.c_void_p
    lib.getCreators(ctypes.byref(n))
    print(nvinfer.fake_registry_log().decode(), end="")
    print("count", n.value)
    """
)


def test_a_plain_dlopen_registers_the_plugins_with_full_tensorrt(library, tmp_path):
    """Triton server, DeepStream and ORT's TensorRT EP only dlopen the library: with full TensorRT
    in the process it registers its creators as it loads, and withdraws that registration when
    loadLibrary (trtexec --dynamicPlugins) asks for getCreators, so nothing is registered twice."""
    fake = tmp_path / "libnvinfer.so.10"
    inc, cuda = native.library.find_trt_include(), native.library.find_cuda_include()
    subprocess.run(["g++", "-std=c++17", "-shared", "-fPIC", "-Wno-deprecated-declarations", f"-I{inc}", f"-I{cuda}",
                    "-Wl,-soname,libnvinfer.so.10", str(Path(__file__).with_name("fake_nvinfer.cpp")), "-o", str(fake)],
                   check=True)
    script = tmp_path / "host.py"
    script.write_text(_DLOPEN_HOST)
    proc = subprocess.run([sys.executable, str(script), str(fake), str(library.path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    at_load, after = proc.stdout.split("-- loadLibrary calls getCreators --\n")
    ops = [op.op_type for op in OPS]
    assert at_load.splitlines() == [f"register {DOMAIN}::{op}" for op in ops]
    assert after.splitlines()[:-1] == at_load.splitlines() + [f"deregister {op}" for op in ops]
    assert after.splitlines()[-1] == "count 2"


def test_without_tensorrt_in_the_process_loading_registers_nothing(library):
    """No libnvinfer loaded (or TensorRT-RTX, which crashes on static registration): loading the
    library touches no registry; TensorRT-RTX's load_library path is covered above."""
    proc = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(library.path)!r}); print('ok')"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_a_graph_without_omnimoe_nodes_needs_no_library(tmp_path, capsys):
    """The standard-op twin builds with the default --plugins native: no library, no compiler needed."""
    from export.onnx_export import export_onnx

    onnx_path = tmp_path / "standard.onnx"
    export_onnx(_small_layer(), onnx_path, example_inputs=(torch.zeros(2, 3, 32),), ops="standard",
                input_names=["x"], output_names=["y"], dynamic_shapes=({0: "batch", 1: "seq"},))
    engine = tmp_path / "out" / "standard.engine"
    assert _cli(["build", onnx_path, "-o", engine, "--backend", RTX, "--no-progress", "--tokens", "1:8:16"]) == 0
    assert sorted(p.name for p in engine.parent.iterdir()) == ["standard.engine", "standard.engine.json"]
    assert json.loads(build_mod.sidecar_path(engine).read_text())["plugin_library"] is None
    assert build_mod.engine_plugin_library(engine) is None


# A stand-in for libcuda.so.1 that loads nothing and runs nothing: it logs every memset and kernel
# launch of the library (entry name, grid, argument values) so that the C++ launch sequences can
# be compared with the Python launchers' without a GPU.
_FAKE_LIBCUDA = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
static FILE* out(void)
{
    static FILE* f = NULL;
    if (!f)
        f = fopen(getenv("FAKE_CUDA_LOG"), "w");
    return f;
}
CUresult cuCtxGetCurrent(void** ctx) { *ctx = (void*) 0x1; return 0; }
CUresult cuCtxGetDevice(int* dev) { *dev = 0; return 0; }
CUresult cuDeviceGetAttribute(int* v, int attr, int dev)
{
    (void) dev;
    *v = attr == 75 ? atoi(getenv("FAKE_CUDA_MAJOR")) : attr == 76 ? atoi(getenv("FAKE_CUDA_MINOR")) : 0;
    return 0;
}
CUresult cuModuleLoadData(void** module, void const* image) { *module = (void*) image; return 0; }
CUresult cuModuleGetFunction(void** fn, void* module, char const* name) { (void) module; *fn = strdup(name); return 0; }
CUresult cuFuncGetAttribute(int* v, int attr, void* fn) { (void) attr; (void) fn; *v = 0; return 0; }
/* FAKE_CUDA_OPTIN_LIMIT: refuse a dynamic shared memory opt-in (attribute 8) above it, as a GPU
   with less shared memory per block does. */
CUresult cuFuncSetAttribute(void* fn, int attr, int v)
{
    (void) fn;
    char const* limit = getenv("FAKE_CUDA_OPTIN_LIMIT");
    return (limit && attr == 8 && v > atoi(limit)) ? 1 : 0;
}
CUresult cuGetErrorString(CUresult status, char const** text) { (void) status; *text = "fake"; return 0; }
CUresult cuMemsetD32Async(uint64_t ptr, unsigned value, size_t count, void* stream)
{
    (void) stream;
    fprintf(out(), "memset %llu %u %llu\n", (unsigned long long) ptr, value, (unsigned long long) count);
    fflush(out());
    return 0;
}
/* FAKE_CUDA_ARITY: ";name=ppi;..." (p: 8-byte pointer, i: int32) */
CUresult cuLaunchKernel(void* fn, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
    unsigned shared, void* stream, void** params, void** extra)
{
    (void) gy; (void) gz; (void) by; (void) bz; (void) stream; (void) extra; (void) shared;
    char const* name = (char const*) fn;
    char key[256];
    snprintf(key, sizeof key, ";%s=", name);
    char const* spec = strstr(getenv("FAKE_CUDA_ARITY"), key);
    if (!spec)
        return 1;
    spec += strlen(key);
    fprintf(out(), "launch %s %u %u", name, gx, bx);
    for (int i = 0; spec[i] && spec[i] != ';'; ++i)
    {
        if (spec[i] == 'p')
            fprintf(out(), " %llu", (unsigned long long) *(uint64_t const*) params[i]);
        else
            fprintf(out(), " %d", *(int32_t const*) params[i]);
    }
    fprintf(out(), "\n");
    fflush(out());
    return 0;
}
"""

_FAKE_HOST = textwrap.dedent(
    """
    import ctypes, json, os, sys
    fake, library, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ctypes.CDLL(fake, mode=os.RTLD_NOW | os.RTLD_GLOBAL)  # what dlopen("libcuda.so.1") then finds
    lib = ctypes.CDLL(library)
    P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.omnimoe_native_experts_launch.argtypes = [P] * 7 + [I64, I64] + [I32] * 5 + [P]
    lib.omnimoe_native_experts_launch.restype = I32
    lib.omnimoe_native_last_error.restype = ctypes.c_char_p
    for c in cases:
        print("case", c["T"], c["dtype"], flush=True)
        ptrs = [(i + 1) << 40 for i in range(7)]  # x, up, down, gates, indices, y, workspace
        rc = lib.omnimoe_native_experts_launch(*ptrs, c["ws"], c["T"], c["d"], c["N"], c["K"], c["dtype"], c["act"], None)
        assert rc == 0, (rc, lib.omnimoe_native_last_error())
    """
)

_PTR_NAMES = ("x", "up", "down", "gates", "indices", "y", "ws")


def _run_fake_host(host_source, library_path, cases, tmp_path, env=None):
    """Run `host_source` (argv: fake libcuda, library, cases as JSON) against the fake libcuda;
    returns (the launch log's path, the kernels' arity spec)."""
    fake = tmp_path / "libcuda.so.1"
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-x", "c", "-", "-o", str(fake)],
                   input=_FAKE_LIBCUDA, text=True, check=True)
    arity = "".join(
        f";{fn.__name__}=" + "".join("p" if p.name.endswith("_ptr") else "i" for p in fn.params if not p.is_constexpr)
        for fn in codegen._launched_kernels()) + ";"
    log = tmp_path / "launches.log"
    script = tmp_path / "fake_host.py"
    script.write_text(host_source)
    env = dict(os.environ, FAKE_CUDA_LOG=str(log), FAKE_CUDA_ARITY=arity, FAKE_CUDA_MAJOR="9", FAKE_CUDA_MINOR="0",
               OMNIMOE_NATIVE_QUIET="1", **(env or {}))
    proc = subprocess.run([sys.executable, str(script), str(fake), str(library_path), json.dumps(cases)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return log, arity


def _native_launch_log(library_path, cases, tmp_path, env=None):
    """[(case events)] where an event is ("memset", (buffer, offset), count) or
    ("launch", kernel, grid, threads, (args...)), pointers as (buffer name, byte offset)."""
    log, arity = _run_fake_host(_FAKE_HOST, library_path, cases, tmp_path, env)

    def ptr(v):
        v = int(v)
        return (_PTR_NAMES[(v >> 40) - 1], v & ((1 << 40) - 1))

    spec = {part.split("=")[0]: part.split("=")[1] for part in arity.strip(";").split(";")}
    events = []
    for line in log.read_text().splitlines():
        kind, *rest = line.split()
        if kind == "memset":
            assert rest[1] == "0"
            events.append(("memset", ptr(rest[0]), int(rest[2])))
        else:
            name, grid, threads, *vals = rest
            args = tuple(ptr(v) if t == "p" else int(v) for t, v in zip(spec[name], vals))
            events.append(("launch", name, int(grid), int(threads), args))
    return events


def _python_launch_log(cases, monkeypatch):
    """The same events from expert_grouped_matmul_triton("auto") itself, its kernels replaced by
    recorders (CPU tensors under TRITON_INTERPRET=1; nothing runs but the workspace zeroing)."""
    from omnimoe.kernels import experts, grid_row

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    events, buffers = [], {}

    def norm(t):
        for name, base in buffers.items():
            lo = base.data_ptr()
            if lo <= t.data_ptr() < lo + base.numel() * base.element_size() or t.data_ptr() == lo:
                return (name, t.data_ptr() - lo)
        raise AssertionError("a tensor outside the launch's buffers")

    class Recorder:
        def __init__(self, fn):
            self.name = fn.__name__

        def __getitem__(self, grid):
            def run(*args, **meta):
                events.append(("launch", self.name, int(grid[0]), 32 * int(meta.get("num_warps", 4)),
                               tuple(norm(a) if isinstance(a, torch.Tensor) else int(a) for a in args)))
            return run

    launched = codegen._launched_kernels()
    for module in (experts, grid_row):
        for name in dir(module):
            obj = getattr(module, name)
            if any(obj is fn for fn in launched):
                monkeypatch.setattr(module, name, Recorder(obj))
    original_zero = torch.Tensor.zero_

    def zero(t):
        events.append(("memset", norm(t), t.numel() * t.element_size() // 4))
        return original_zero(t)

    monkeypatch.setattr(torch.Tensor, "zero_", zero)
    dtypes = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16}
    acts = {v: k for k, v in experts.ACT_IDS.items()}
    logs = []
    for c in cases:
        T, d, N, K, dt = c["T"], c["d"], c["N"], c["K"], dtypes[c["dtype"]]
        buffers.clear()
        buffers.update(x=torch.zeros(T, d, dtype=dt), up=torch.zeros(N, d, dtype=dt), down=torch.zeros(N, d, dtype=dt),
                       gates=torch.zeros(T, K), indices=torch.zeros(T, K, dtype=torch.int32),
                       y=torch.zeros(T, d, dtype=dt), ws=torch.zeros(c["ws"], dtype=torch.uint8))
        b = buffers
        start = len(events)
        experts.expert_grouped_matmul_triton(b["x"], b["up"], b["down"], b["gates"], b["indices"], acts[c["act"]],
                                             out=b["y"], workspace=b["ws"])
        logs.append(events[start:])
    return logs


def test_native_launch_sequences_are_the_python_launchers(library, tmp_path, monkeypatch):
    """Argument by argument, without a GPU: for token counts that take each schedule (token-centric,
    hybrid, grid-row), omnimoe_native_experts_launch zeroes the same workspace buffers and launches
    the same kernels with the same grids and arguments, pointers at the same workspace offsets, as
    expert_grouped_matmul_triton(schedule="auto")."""
    from omnimoe.kernels.experts import ACT_IDS

    d, N, K = 32, 64, 6  # the layer models' experts variant (gelu; fp32, fp16, bf16)
    cases, want = [], []
    for T in (7, 230, 300, 4096):
        for dtype in (0, 1, 2):
            cases.append(dict(T=T, d=d, N=N, K=K, dtype=dtype, act=ACT_IDS["gelu"],
                              ws=expert_workspace_bytes(T, K, N, d)))
            want.append(_python_schedule(T, K, N))
    assert set(want) == {"token", "hybrid", "grid"}
    native_events = _native_launch_log(library.path, cases, tmp_path)
    python_logs = _python_launch_log(cases, monkeypatch)
    assert native_events == [e for log in python_logs for e in log]
    for log, schedule in zip(python_logs, want):
        kernels = [e[1] for e in log if e[0] == "launch"]
        assert ("_gr_panel_kernel" in kernels) == (schedule == "grid"), (schedule, kernels)


def test_grid_schedule_falls_back_where_its_shared_memory_does_not_fit(library, tmp_path, monkeypatch):
    """On a GPU that refuses the panel kernel's shared memory opt-in (sm_86/89/120 allow ~99 KiB per
    block), grid-row token counts run the hybrid schedule, in the native library (from the loaded
    kernel's own size) as in Python (grid_row.fits_device): the same launches as Python's hybrid."""
    from omnimoe.kernels import grid_row
    from omnimoe.kernels.experts import ACT_IDS

    d, N, K = 32, 64, 6
    cases = [dict(T=T, d=d, N=N, K=K, dtype=dtype, act=ACT_IDS["gelu"], ws=expert_workspace_bytes(T, K, N, d))
             for T in (300, 4096) for dtype in (1, 2)]  # 16-bit: the pipelined panel kernel needs > 48 KiB
    assert {_python_schedule(c["T"], K, N) for c in cases} == {"grid"}
    native_events = _native_launch_log(library.path, cases, tmp_path, env={"FAKE_CUDA_OPTIN_LIMIT": str(99 * 1024)})
    monkeypatch.setattr(grid_row, "fits_device", lambda device: False)
    python_logs = _python_launch_log(cases, monkeypatch)
    assert native_events == [e for log in python_logs for e in log]
    kernels = {e[1] for e in native_events if e[0] == "launch"}
    assert "_expert_tile_kernel" in kernels and "_gr_panel_kernel" not in kernels


_MANY_TOKENS_HOST = textwrap.dedent(
    """
    import ctypes, json, os, sys
    fake, library, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    ctypes.CDLL(fake, mode=os.RTLD_NOW | os.RTLD_GLOBAL)
    lib = ctypes.CDLL(library)
    P, I32, I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
    lib.omnimoe_native_topk_launch.argtypes = [P] * 5 + [I64, I64] + [I32] * 3 + [P]
    lib.omnimoe_native_experts_launch.argtypes = [P] * 7 + [I64, I64] + [I32] * 5 + [P]
    lib.omnimoe_native_last_error.restype = ctypes.c_char_p
    ptrs = [(i + 1) << 40 for i in range(7)]
    for c in cases:
        rc = lib.omnimoe_native_topk_launch(*ptrs[:5], 1 << 40, c["T"], c["s"], c["K"], 0, None)
        assert rc == 0, lib.omnimoe_native_last_error()
        rc = lib.omnimoe_native_experts_launch(*ptrs, 1 << 40, c["T"], c["d"], c["N"], c["K"], 2, 0, None)
        assert rc == 0, lib.omnimoe_native_last_error()
    """
)


def test_native_many_token_launches_take_the_throughput_configs(tmp_path):
    """From MANY_TOKENS tokens per launch the native library launches the router's small-K kernel
    and the token-centric experts with the configurations product_key_topk_triton and
    expert_grouped_matmul_triton then use (threads per block = 32 * their num_warps), and below it
    with the latency ones; at d = 1024, s = 1024, K = 16 the two differ. The hybrid schedule's
    token-centric second stage (N = 4000: no grid) too."""
    from omnimoe.kernels import experts, router
    from omnimoe.kernels._launch import MANY_TOKENS

    d, s, K = 1024, 1024, 16
    variants = [native.TopKVariant(s, K, "product"), native.ExpertsVariant(d, s * s, K, "bf16", "silu"),
                native.ExpertsVariant(d, 4000, K, "bf16", "silu")]
    lib = native.build_library(variants, tmp_path / native.LIBRARY_NAME, sms=native.parse_sms("90"))
    cases = [dict(T=T, d=d, s=s, K=K, N=s * s) for T in (MANY_TOKENS - 1, MANY_TOKENS)] + [
        dict(T=5000, d=d, s=s, K=K, N=4000)]
    assert [_python_schedule(c["T"], K, c["N"]) for c in cases] == ["token", "token", "hybrid"]
    log, _ = _run_fake_host(_MANY_TOKENS_HOST, lib.path, cases, tmp_path)
    launches = [line.split()[1:4] for line in log.read_text().splitlines() if line.startswith("launch")]
    launches = [item for item in launches if item[0] in ("_product_key_topk_small_kernel", "_token_centric_kernel")]
    want = []
    for c in cases:
        many = c["T"] >= MANY_TOKENS
        topk_warps = router.topk_kernel_config(s, K, "product", many_tokens=many)[1]["num_warps"]
        token_warps = experts.token_centric_config(d, K, 0, c["N"] == 4000, many)["num_warps"]
        want += [["_product_key_topk_small_kernel", str(c["T"]), str(32 * topk_warps)],
                 ["_token_centric_kernel", str(c["T"]), str(32 * token_warps)]]
    assert launches == want
    assert want[0][2] != want[2][2] and want[1][2] != want[3][2]  # the configs differ across the boundary
    assert want[5][2] != str(32 * experts.token_centric_config(d, K, 0, True)["num_warps"])
