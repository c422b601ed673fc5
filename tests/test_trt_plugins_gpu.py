"""TensorRT plugin `enqueue` on a GPU (issue 5): raw device pointers in, Triton kernels out.

Engines cannot be executed on the H200 here (TensorRT-RTX refuses sm_90 and full TensorRT is not
installable, SPEC §5), so these tests drive the plugins the way TensorRT's runtime does: create
them through the registered creators (runtime phase, fields encoded as the ONNX parser encodes
them), size the workspace with `get_workspace_size` from a profile's maximum T, build the
PluginTensorDescs by hand, and call `enqueue` with the raw device pointers of torch tensors on a
side stream and inside CUDA-graph capture. Results are compared with the reference ops for
fp32 and bf16 at several T, including 1.
"""
from __future__ import annotations

import pytest
import torch

from plugin_checks import TOL, assert_topk_matches_reference, expert_inputs, router_inputs
from trt_fields import plugin_fields
from export.schemas import DOMAIN, EXPERT_GROUPED_MATMUL, PRODUCT_KEY_TOPK
from omnimoe.errors import OmniMoEInputError
from omnimoe.ops import expert_grouped_matmul_reference, product_key_topk_reference

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
trt_plugins = pytest.importorskip("trt_plugins")
try:
    trt = trt_plugins.register()
except (OmniMoEInputError, ImportError, OSError) as e:
    pytest.skip(f"no usable TensorRT module: {e}", allow_module_level=True)

from omnimoe.kernels import expert_grouped_matmul_triton, product_key_topk_triton  # noqa: E402

MAX_TOKENS = 1024  # the "profile max" the workspaces are sized for
TOKENS = [1, 7, 300, MAX_TOKENS]
_TRT_TYPE = {torch.float32: "FLOAT", torch.float16: "HALF", torch.bfloat16: "BF16", torch.int32: "INT32"}


def create_runtime_plugin(op_type: str, **fields):
    """Through the registry, as the runtime does when it deserializes an engine."""
    creator = trt.get_plugin_registry().get_creator(op_type, "1", DOMAIN)
    assert creator is not None, f"{op_type} is not registered"
    plugin = creator.create_plugin(op_type, plugin_fields(trt, **fields), trt.TensorRTPhase.RUNTIME)
    runtime = plugin.get_capability_interface(trt.PluginCapabilityType.RUNTIME).attach_to_context(None)
    return runtime


def desc(t: torch.Tensor):
    d = trt.PluginTensorDesc()
    d.dims = trt.Dims(list(t.shape))
    d.type = getattr(trt.DataType, _TRT_TYPE[t.dtype])
    d.format = trt.TensorFormat.LINEAR
    return d


def dyn_desc(t: torch.Tensor, token_dims: bool):
    """DynamicPluginTensorDesc with dim 0 spanning 1..MAX_TOKENS when it is the token dim."""
    d = trt.DynamicPluginTensorDesc()
    d.desc = desc(t)
    shape = list(t.shape)
    lo = [1] + shape[1:] if token_dims else shape
    hi = [MAX_TOKENS] + shape[1:] if token_dims else shape
    d.min, d.opt, d.max = trt.Dims(lo), trt.Dims(shape), trt.Dims(hi)
    return d


def workspace_for(plugin, inputs, outputs, token_flags_in, token_flags_out) -> torch.Tensor:
    build = plugin.get_capability_interface(trt.PluginCapabilityType.BUILD)
    nbytes = build.get_workspace_size(
        [dyn_desc(t, f) for t, f in zip(inputs, token_flags_in)], [dyn_desc(t, f) for t, f in zip(outputs, token_flags_out)]
    )
    assert isinstance(nbytes, int) and nbytes >= 0
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device="cuda")


def enqueue(plugin, inputs, outputs, workspace, stream):
    plugin.on_shape_change([desc(t) for t in inputs], [desc(t) for t in outputs])
    plugin.enqueue(
        [desc(t) for t in inputs],
        [desc(t) for t in outputs],
        [t.data_ptr() for t in inputs],
        [t.data_ptr() for t in outputs],
        workspace.data_ptr(),
        stream.cuda_stream,
    )


def _allocations() -> int:
    return torch.cuda.memory_stats().get("allocation.all.allocated", 0)


def enqueue_counting_allocations(plugin, inputs, outputs, workspace, stream):
    """enqueue, asserting that it made no CUDA allocation through torch's allocator.

    Counted around the call alone: entering torch.cuda.graph itself may allocate (e.g. the
    generators' graph-safe seed/offset state), which is not the plugin's doing.
    """
    before = _allocations()
    enqueue(plugin, inputs, outputs, workspace, stream)
    assert _allocations() == before, "enqueue allocated device memory"


# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["product", "softmax"])
@pytest.mark.parametrize("s,top_k", [(8, 6), (32, 16)])
def test_topk_enqueue_side_stream_and_graph_capture(s, top_k, gate):
    plugin = create_runtime_plugin(PRODUCT_KEY_TOPK.op_type, top_k=top_k, gate=gate)
    for T in TOKENS:
        lx, ly = router_inputs(T, s, seed=T)
        gates = torch.full((T, top_k), float("nan"), device="cuda")
        indices = torch.full((T, top_k), -1, dtype=torch.int32, device="cuda")
        ws = workspace_for(plugin, [lx, ly], [gates, indices], [True, True], [True, True])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        enqueue(plugin, [lx, ly], [gates, indices], ws, side)
        side.synchronize()
        assert_topk_matches_reference(gates, indices, lx, ly, top_k, gate)
        # Same kernel as backend="triton": identical results.
        tg, ti = product_key_topk_triton(lx, ly, top_k, gate)
        assert torch.equal(ti, indices) and torch.equal(tg, gates)

        # CUDA graph: capture enqueue, then replay on new data written into the same buffers.
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            enqueue_counting_allocations(plugin, [lx, ly], [gates, indices], ws, side)
        new_x, new_y = router_inputs(T, s, seed=10_000 + T)
        lx.copy_(new_x)
        ly.copy_(new_y)
        gates.fill_(float("nan"))
        indices.fill_(-1)
        graph.replay()
        torch.cuda.synchronize()
        assert_topk_matches_reference(gates, indices, lx, ly, top_k, gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_grouped_matmul_enqueue_side_stream_and_graph_capture(dtype, activation):
    d, N, K = 128, 1024, 16
    plugin = create_runtime_plugin(EXPERT_GROUPED_MATMUL.op_type, activation=activation)
    for T in TOKENS:
        x, up, down, gates, indices = expert_inputs(T, d, N, K, dtype, seed=T)
        y = torch.full((T, d), float("nan"), device="cuda", dtype=dtype)
        ins = [x, up, down, gates, indices]
        ws = workspace_for(plugin, ins, [y], [True, False, False, True, True], [True])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        enqueue(plugin, ins, [y], ws, side)
        side.synchronize()
        ref = expert_grouped_matmul_reference(x, up, down, gates, indices, activation)
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])
        direct = expert_grouped_matmul_triton(x, up, down, gates, indices, activation)
        torch.testing.assert_close(y.float(), direct.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)

        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            enqueue_counting_allocations(plugin, ins, [y], ws, side)
        for dst, src in zip(ins, expert_inputs(T, d, N, K, dtype, seed=20_000 + T)):
            dst.copy_(src)
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = expert_grouped_matmul_reference(x, up, down, gates, indices, activation)
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_layer_chain_captured_in_one_graph(dtype):
    """Router log-probs -> top-K plugin -> grouped-matmul plugin, both enqueued in one capture."""
    s, K, d = 16, 8, 64
    N = s * s
    topk = create_runtime_plugin(PRODUCT_KEY_TOPK.op_type, top_k=K, gate="softmax")
    experts = create_runtime_plugin(EXPERT_GROUPED_MATMUL.op_type, activation="silu")
    for T in (1, 33, 257):
        lx, ly = router_inputs(T, s, seed=T)
        x, up, down, _, _ = expert_inputs(T, d, N, K, dtype, seed=T)
        gates = torch.empty(T, K, device="cuda")
        indices = torch.empty(T, K, dtype=torch.int32, device="cuda")
        y = torch.empty(T, d, device="cuda", dtype=dtype)
        ws1 = workspace_for(topk, [lx, ly], [gates, indices], [True, True], [True, True])
        ws2 = workspace_for(experts, [x, up, down, gates, indices], [y], [True, False, False, True, True], [True])
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        enqueue(topk, [lx, ly], [gates, indices], ws1, side)  # warm-up (kernel compilation)
        enqueue(experts, [x, up, down, gates, indices], [y], ws2, side)
        side.synchronize()
        enqueue_counting_allocations(topk, [lx, ly], [gates, indices], ws1, side)  # warm: no allocation
        enqueue_counting_allocations(experts, [x, up, down, gates, indices], [y], ws2, side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            enqueue_counting_allocations(topk, [lx, ly], [gates, indices], ws1, side)
            enqueue_counting_allocations(experts, [x, up, down, gates, indices], [y], ws2, side)
        y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref_g, ref_i = product_key_topk_reference(lx, ly, K, "softmax")
        ref = expert_grouped_matmul_reference(x, up, down, ref_g, ref_i, "silu")
        torch.testing.assert_close(y.float(), ref.float(), **TOL[dtype])


def test_descriptor_wrapping_is_zero_copy():
    from trt_plugins import _tensors

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32):
        t = torch.arange(12, device="cuda").reshape(3, 4).to(dtype)
        view = _tensors.as_torch(desc(t), t.data_ptr())
        assert view.dtype == dtype and view.shape == t.shape and view.data_ptr() == t.data_ptr()
        view.add_(1)
        assert torch.equal(t, (torch.arange(12, device="cuda").reshape(3, 4) + 1).to(dtype))
