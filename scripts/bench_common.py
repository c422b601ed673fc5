"""What the benchmark scripts share: CUDA-event timing and the benchmark layer."""
from __future__ import annotations


def event_times_ms(fn, iters: int, warmup: int) -> list[float]:
    """Per-iteration GPU times (CUDA events around each call) after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for a, b in evs:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in evs]


def host_us(fn, iters: int, reps: int = 5) -> float:
    """Host microseconds per call of fn, queued without waiting for the GPU (median of reps runs of
    iters calls, the GPU drained between runs)."""
    import statistics
    import time

    import torch

    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        times.append((time.perf_counter() - t0) / iters * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def capture_graph(fn):
    """(graph, output) of fn captured as a CUDA graph, after two warm-up calls on a side stream
    (as torch recommends: kernels compiled, cuBLAS workspaces made outside the capture)."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def expert_tables(n: int, d: int, device):
    """(up, down) [n, d] bf16 expert tables of scale d^-0.5 (up drawn first)."""
    import torch

    up = (torch.randn(n, d, device=device) * d**-0.5).to(torch.bfloat16)
    down = (torch.randn(n, d, device=device) * d**-0.5).to(torch.bfloat16)
    return up, down


def product_routing(t: int, s: int, k: int, device):
    """(gates, indices) of the exact product-key top-k (product gates) over random per-axis
    log-probs [t, s] (x axis drawn first): the routing the schedule benchmarks use."""
    import torch

    from omnimoe import ops

    px = torch.log_softmax(torch.randn(t, s, device=device), -1)
    py = torch.log_softmax(torch.randn(t, s, device=device), -1)
    return ops.product_key_topk_reference(px, py, k, "product")


def bench_layer(d: int, inter: int, n: int, k: int, t: int):
    """(layer, x): a bf16 OmniMoE layer on the GPU (backend="triton", eval) with router logits of unit
    scale, so routing is as peaked as a trained batch-normed router's, and x [t, d]."""
    import torch

    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    dev = torch.device("cuda")
    cfg = OmniMoEConfig(hidden_size=d, intermediate_size=inter, num_experts=n, top_k=k, hidden_act="silu")
    layer = OmniMoELayer(cfg, backend="triton", device=dev, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        layer.router_gate_x.weight.normal_(0, d**-0.5)
        layer.router_gate_y.weight.normal_(0, d**-0.5)
    return layer, torch.randn(t, d, device=dev, dtype=torch.bfloat16)
