"""The native plugin library on a GPU (issue 10): its C ABI launches and its own enqueue.

The library is built here, for this GPU's SM, by the same code `omnimoe build --plugins native`
runs (AOT triton compile + generated C++ + g++; $TENSORRT_INCLUDE_DIR or the kernel-lens wheel
provides TensorRT's headers). The tests call, through ctypes with torch CUDA tensors:
- `omnimoe_native_topk_launch` / `omnimoe_native_experts_launch`, the exact functions the plugins'
  `enqueue` calls, on a side stream and inside CUDA-graph capture;
- the TensorRT-free harness, which creates each plugin through its creator with parser-encoded
  fields and runs the plugin's own onShapeChange + enqueue;
for fp32/fp16/bf16, T = 1, 7, 100, 300, 4096, K <= s and K > s (both router kernels, all three expert
schedules: token-centric, hybrid and grid-row, which "auto" picks at the larger T of these square-N
shapes, the hybrid below GRID_ROW_MIN_TOKENS), all four activations and both gates, against the reference ops. Engines themselves
cannot run here (SPEC §5).
"""
from __future__ import annotations

import os

import pytest
import torch

from plugin_checks import TOL, assert_topk_matches_reference, expert_inputs, router_inputs
from omnimoe.ops import expert_grouped_matmul_reference, product_key_topk_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from omnimoe.kernels import expert_grouped_matmul_triton, product_key_topk_triton  # noqa: E402
from trt_plugins import native  # noqa: E402

# 100: the hybrid schedule at N = 36 and 144 (T*K >= 20 N below GRID_ROW_MIN_TOKENS); 300 and 4096
# take the grid-row one where T*K >= 20 N.
TOKENS = [1, 7, 100, 300, 4096]
D = 64
# (s, K): K <= s (register router), K > s with K <= 64 (register router), K > 64 (workspace router).
ROUTER_CASES = [(16, 8), (6, 20), (12, 100)]
GATES = ["product", "softmax"]
ACTIVATIONS = ["silu", "gelu", "relu", "gelu_tanh"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# (d, N = s*s with s = 64, K) where "auto" takes the grid-row schedule from T = 640 (T*K >= 20 N).
GRID_CASE = (128, 4096, 128)


def _variants():
    out = [native.TopKVariant(s, k, g) for s, k in ROUTER_CASES for g in GATES]
    s, k = ROUTER_CASES[0]
    out += [native.ExpertsVariant(D, s * s, k, dt, act) for dt in DTYPES for act in ACTIVATIONS]
    for s, k in ROUTER_CASES[1:]:
        out += [native.ExpertsVariant(D, s * s, k, dt, "silu") for dt in DTYPES]
    d, N, K = GRID_CASE
    out += [native.ExpertsVariant(d, N, K, dt, "silu") for dt in ("fp32", "bf16")]
    return out


def _this_sm() -> int:
    major, minor = torch.cuda.get_device_capability()
    return major * 10 + minor


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    path = tmp_path_factory.mktemp("native") / native.LIBRARY_NAME
    native.build_library(_variants(), path, sms=[_this_sm()])
    lib = native.NativeLib(path)
    torch.zeros(1, device="cuda")  # creates the primary context the kernels load into
    assert lib.prepare() == 0, lib.error()  # load every kernel before any capture
    return lib


def _stream_ptr(stream) -> int:
    return stream.cuda_stream


def topk_launch(lib, lx, ly, top_k, gate, stream, harness=False):
    T, s = lx.shape
    gates = torch.full((T, top_k), float("nan"), device="cuda")
    indices = torch.full((T, top_k), -1, dtype=torch.int32, device="cuda")
    ws = torch.empty(max(1, lib.topk_workspace_bytes(T, s, top_k)), dtype=torch.uint8, device="cuda")
    stream.wait_stream(torch.cuda.current_stream())  # the fills above ran there
    run_topk(lib, lx, ly, gates, indices, ws, top_k, gate, stream, harness)
    return gates, indices, ws


def run_topk(lib, lx, ly, gates, indices, ws, top_k, gate, stream, harness=False):
    T, s = lx.shape
    if harness:
        rc = lib.harness_topk(top_k, gate.encode(), T, s, lx.data_ptr(), ly.data_ptr(), gates.data_ptr(),
                              indices.data_ptr(), ws.data_ptr(), _stream_ptr(stream))
    else:
        rc = lib.topk_launch(lx.data_ptr(), ly.data_ptr(), gates.data_ptr(), indices.data_ptr(), ws.data_ptr(),
                             ws.numel(), T, s, top_k, int(gate == "softmax"), _stream_ptr(stream))
    assert rc == 0, lib.error()


def run_experts(lib, x, up, down, gates, indices, y, ws, activation, stream, harness=False):
    T, d = x.shape
    N, K = up.shape[0], gates.shape[1]
    dtype = native.capi.DTYPE_CODES[{v: k for k, v in DTYPES.items()}[x.dtype]]
    ptrs = [t.data_ptr() for t in (x, up, down, gates, indices, y)]
    if harness:
        rc = lib.harness_experts(activation.encode(), dtype, T, d, N, K, *ptrs, ws.data_ptr(), _stream_ptr(stream))
    else:
        from omnimoe.kernels.experts import ACT_IDS

        rc = lib.experts_launch(*ptrs, ws.data_ptr(), ws.numel(), T, d, N, K, dtype, ACT_IDS[activation],
                                _stream_ptr(stream))
    assert rc == 0, lib.error()


def experts_buffers(lib, T, d, N, K, dtype):
    y = torch.full((T, d), float("nan"), device="cuda", dtype=dtype)
    ws = torch.empty(lib.experts_workspace_bytes(T, K, N, d), dtype=torch.uint8, device="cuda")
    return y, ws


def _side_stream():
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    return side


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("harness", [False, True], ids=["c_abi", "plugin_enqueue"])
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("s,top_k", ROUTER_CASES)
def test_topk_matches_reference_and_triton(lib, s, top_k, gate, harness):
    for T in TOKENS:
        lx, ly = router_inputs(T, s, seed=T + s)
        side = _side_stream()
        gates, indices, _ = topk_launch(lib, lx, ly, top_k, gate, side, harness)
        side.synchronize()
        assert_topk_matches_reference(gates, indices, lx, ly, top_k, gate)
        # The same kernel as backend="triton": the same experts in the same order.
        tg, ti = product_key_topk_triton(lx, ly, top_k, gate)
        assert torch.equal(ti, indices)
        torch.testing.assert_close(tg, gates, atol=1e-6, rtol=1e-6)


def _expert_cases():
    s, k = ROUTER_CASES[0]
    cases = [(dt, act, s * s, k) for dt in DTYPES for act in ACTIVATIONS]
    cases += [(dt, "silu", s * s, k) for s, k in ROUTER_CASES[1:] for dt in DTYPES]
    return cases


@pytest.mark.parametrize("harness", [False, True], ids=["c_abi", "plugin_enqueue"])
@pytest.mark.parametrize("dtype,activation,N,K", _expert_cases())
def test_experts_match_reference_and_triton(lib, dtype, activation, N, K, harness):
    dt = DTYPES[dtype]
    for T in TOKENS:
        x, up, down, gates, indices = expert_inputs(T, D, N, K, dt, seed=T)
        y, ws = experts_buffers(lib, T, D, N, K, dt)
        side = _side_stream()
        run_experts(lib, x, up, down, gates, indices, y, ws, activation, side, harness)
        side.synchronize()
        ref = expert_grouped_matmul_reference(x, up, down, gates, indices, activation)
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dt])
        direct = expert_grouped_matmul_triton(x, up, down, gates, indices, activation)
        tight = dict(atol=1e-5, rtol=1e-5) if dt == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(y.float(), direct.float(), **tight)


def _python_schedule(T, K, N) -> str:
    from omnimoe.kernels.experts import EXPERT_CENTRIC_SCHEDULE, use_expert_centric, use_grid_row

    if use_grid_row(T, K, N):
        return "grid"
    return EXPERT_CENTRIC_SCHEDULE if use_expert_centric(T, K, N) else "token"


@pytest.mark.parametrize("harness", [False, True], ids=["c_abi", "plugin_enqueue"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_experts_grid_row_schedule(lib, dtype, harness):
    """The grid-row schedule (grid_row.py) through the library: chosen where "auto" chooses it, on
    a garbage-filled workspace (what it accumulates into is zeroed by the launch itself), with a
    repeated expert id per token (its terms add), against the reference and the Python launcher."""
    d, N, K = GRID_CASE
    dt = DTYPES[dtype]
    for T, want in ((1024, "grid"), (2048, "grid"), (300, "token")):
        assert _python_schedule(T, K, N) == want
        assert native.capi.SCHEDULES[lib.experts_schedule(T, K, N)] == want
        x, up, down, gates, indices = expert_inputs(T, d, N, K, dt, seed=T)
        indices[:, 1] = indices[:, 0]
        y, ws = experts_buffers(lib, T, d, N, K, dt)
        ws.fill_(255)
        side = _side_stream()
        run_experts(lib, x, up, down, gates, indices, y, ws, "silu", side, harness)
        side.synchronize()
        assert native.capi.SCHEDULES[lib.experts_last_schedule()] == want  # the launch ran it
        ref = expert_grouped_matmul_reference(x, up, down, gates, indices, "silu")
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dt])
        direct = expert_grouped_matmul_triton(x, up, down, gates, indices, "silu")
        tight = dict(atol=1e-5, rtol=1e-5) if dt == torch.float32 else dict(atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(y.float(), direct.float(), **tight)


@pytest.mark.parametrize("harness", [False, True], ids=["c_abi", "plugin_enqueue"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_router_and_experts_captured_in_one_graph(lib, dtype, harness):
    """top-K then experts, captured together on a side stream, replayed on new data: each expert
    schedule (its memsets and launches) captured."""
    dt = DTYPES[dtype]
    for (s, K), T, schedule in [((16, 8), 7, "token"), ((16, 8), 4096, "grid"), ((12, 100), 100, "hybrid"),
                                ((12, 100), 300, "grid")]:
        N = s * s
        assert native.capi.SCHEDULES[lib.experts_schedule(T, K, N)] == schedule == _python_schedule(T, K, N)
        lx, ly = router_inputs(T, s, seed=T)
        x, up, down, _, _ = expert_inputs(T, D, N, K, dt, seed=T)
        gates, indices, ws1 = topk_launch(lib, lx, ly, K, "softmax", torch.cuda.current_stream(), harness)
        y, ws2 = experts_buffers(lib, T, D, N, K, dt)
        side = _side_stream()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            run_topk(lib, lx, ly, gates, indices, ws1, K, "softmax", side, harness)
            run_experts(lib, x, up, down, gates, indices, y, ws2, "silu", side, harness)
        new_lx, new_ly = router_inputs(T, s, seed=50_000 + T)
        lx.copy_(new_lx)
        ly.copy_(new_ly)
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_g, ref_i = product_key_topk_reference(lx, ly, K, "softmax")
        assert_topk_matches_reference(gates, indices, lx, ly, K, "softmax")
        ref = expert_grouped_matmul_reference(x, up, down, ref_g, ref_i, "silu")
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dt])


def test_misaligned_pointer_is_refused(lib):
    s, K = ROUTER_CASES[0]
    lx, ly = router_inputs(8, s, seed=1)
    gates = torch.empty(8 * K + 4, device="cuda")
    indices = torch.empty(8, K, dtype=torch.int32, device="cuda")
    rc = lib.topk_launch(lx.data_ptr(), ly.data_ptr(), gates.data_ptr() + 4, indices.data_ptr(), 0, 0, 8, s, K, 0,
                         torch.cuda.current_stream().cuda_stream)
    assert rc == 1 and "gates" in lib.error() and "16-byte aligned" in lib.error()


def test_missing_variant_is_named(lib):
    lx, ly = router_inputs(4, 16, seed=2)
    gates = torch.empty(4, 5, device="cuda")
    indices = torch.empty(4, 5, dtype=torch.int32, device="cuda")
    rc = lib.topk_launch(lx.data_ptr(), ly.data_ptr(), gates.data_ptr(), indices.data_ptr(), 0, 0, 4, 16, 5, 0,
                         torch.cuda.current_stream().cuda_stream)
    assert rc == 3 and "no kernel compiled for s=16, top_k=5" in lib.error()


def test_other_sm_fails_at_deserialization_and_newer_gpu_uses_ptx(tmp_path):
    """A library without this GPU's SM: refused at plugin creation (runtime phase) naming its SMs,
    unless the GPU is newer than every SM built, where the PTX fallback runs (and must be right)."""
    sm = _this_sm()
    variants = [native.TopKVariant(16, 8, "product")]
    newer = min(x for x in native.SUPPORTED_SMS if x > sm) if any(x > sm for x in native.SUPPORTED_SMS) else None
    if newer is not None:
        path = native.build_library(variants, tmp_path / "newer" / native.LIBRARY_NAME, sms=[newer]).path
        lib = native.NativeLib(path)
        lx, ly = router_inputs(8, 16, seed=3)
        gates, indices = torch.empty(8, 8, device="cuda"), torch.empty(8, 8, dtype=torch.int32, device="cuda")
        rc = lib.harness_topk(8, b"product", 8, 16, lx.data_ptr(), ly.data_ptr(), gates.data_ptr(),
                              indices.data_ptr(), 0, torch.cuda.current_stream().cuda_stream)
        assert rc == 1
        assert f"this GPU is sm_{sm}" in lib.error() and f"sm_{newer}" in lib.error()
    older = [x for x in native.SUPPORTED_SMS if x < sm and x != sm]
    if older:
        path = native.build_library(variants, tmp_path / "older" / native.LIBRARY_NAME, sms=[older[0]]).path
        lib = native.NativeLib(path)
        lx, ly = router_inputs(300, 16, seed=4)
        gates, indices, _ = topk_launch(lib, lx, ly, 8, "product", torch.cuda.current_stream(), harness=True)
        torch.cuda.synchronize()
        assert_topk_matches_reference(gates, indices, lx, ly, 8, "product")


@pytest.mark.skipif(not os.environ.get("OMNIMOE_NATIVE_PREBUILT"), reason="no prebuilt library given")
def test_prebuilt_library_from_another_machine():
    """A library compiled elsewhere (e.g. by CI's triton on a CPU machine) runs here."""
    lib = native.NativeLib(os.environ["OMNIMOE_NATIVE_PREBUILT"])
    torch.zeros(1, device="cuda")
    assert lib.prepare() == 0, lib.error()
    for v in lib.info()["variants"]:
        if v["op"] != "OmniProductKeyTopK":
            continue
        lx, ly = router_inputs(300, v["grid_side"], seed=5)
        gates, indices, _ = topk_launch(lib, lx, ly, v["top_k"], v["gate"], torch.cuda.current_stream())
        torch.cuda.synchronize()
        assert_topk_matches_reference(gates, indices, lx, ly, v["top_k"], v["gate"])


def test_batch_above_one_is_flattened_tokens(lib):
    """An engine with batch > 1 profiles hands the plugins [B*S, ...]: each sequence's result is
    what it gets alone."""
    (s, K), B, S = ROUTER_CASES[0], 3, 100
    N = s * s
    lx, ly = router_inputs(B * S, s, seed=7)
    x, up, down, _, _ = expert_inputs(B * S, D, N, K, torch.bfloat16, seed=7)
    stream = torch.cuda.current_stream()
    gates, indices, _ = topk_launch(lib, lx, ly, K, "softmax", stream, harness=True)
    y, ws = experts_buffers(lib, B * S, D, N, K, torch.bfloat16)
    run_experts(lib, x, up, down, gates, indices, y, ws, "silu", stream, harness=True)
    for b in range(B):
        rows = slice(b * S, (b + 1) * S)
        g1, i1, _ = topk_launch(lib, lx[rows].contiguous(), ly[rows].contiguous(), K, "softmax", stream, harness=True)
        y1, ws1 = experts_buffers(lib, S, D, N, K, torch.bfloat16)
        run_experts(lib, x[rows].contiguous(), up, down, g1, i1, y1, ws1, "silu", stream, harness=True)
        torch.cuda.synchronize()
        assert torch.equal(i1, indices[rows]) and torch.equal(g1, gates[rows])
        assert torch.equal(y1, y[rows])


@pytest.mark.parametrize(
    "s,d,K,dtype,activation,gate",
    [
        (2, 100, 1, "fp32", "relu", "product"),  # K = 1, d not a multiple of 16
        (2, 24, 4, "bf16", "gelu", "softmax"),  # K = N
        (33, 48, 65, "fp16", "gelu_tanh", "softmax"),  # odd s, first K of the workspace router
    ],
)
def test_odd_shapes_end_to_end(tmp_path, s, d, K, dtype, activation, gate):
    """Shapes outside the main matrix, each in a library of its own: router then experts, against
    the reference, at a token count that takes the expert-centric schedule where it can."""
    N, dt = s * s, DTYPES[dtype]
    path = native.build_library([native.TopKVariant(s, K, gate), native.ExpertsVariant(d, N, K, dtype, activation)],
                                tmp_path / native.LIBRARY_NAME, sms=[_this_sm()]).path
    lib = native.NativeLib(path)
    for T in (1, 37, 2048):
        lx, ly = router_inputs(T, s, seed=T)
        x, up, down, _, _ = expert_inputs(T, d, N, K, dt, seed=T)
        stream = torch.cuda.current_stream()
        gates, indices, _ = topk_launch(lib, lx, ly, K, gate, stream, harness=True)
        y, ws = experts_buffers(lib, T, d, N, K, dt)
        run_experts(lib, x, up, down, gates, indices, y, ws, activation, stream, harness=True)
        torch.cuda.synchronize()
        assert_topk_matches_reference(gates, indices, lx, ly, K, gate)
        ref = expert_grouped_matmul_reference(x, up, down, gates, indices, activation)
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dt])
