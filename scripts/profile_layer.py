#!/usr/bin/env python3
"""Where the layer's time goes: CUDA-graph ms and the per-kernel CUDA time (torch.profiler) of
bench_layer's bf16 layer at SPEC §7 configs, with the routed-expert schedule the layer picks or a
forced one (`--schedule grid|dense`).

    python3 scripts/profile_layer.py [--configs paper_min,paper_k2048] [--schedule auto] [--rows 14] [--timeline]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import bench_layer, capture_graph, event_times_ms  # noqa: E402
from bench_layer import CONFIGS  # noqa: E402


def _forced(schedule: str):
    """use_dense as the layer should see it for `schedule` (auto: unchanged)."""
    from omnimoe.kernels import experts as ke

    if schedule == "dense":
        return lambda T, K, N: True
    if schedule == "grid":
        return lambda T, K, N: False  # the expert op's auto then takes grid lines where it can
    return ke.use_dense


def timeline(replay) -> None:
    """Start / end / stream of each kernel of one CUDA-graph replay (chrome trace of torch.profiler):
    which kernels of the shared MLP (main stream) and the routed path (side stream) overlap."""
    import json
    import tempfile

    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        replay()
        torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    t0 = kernels[0]["ts"] if kernels else 0
    for e in kernels:
        print(f"  stream {e['args'].get('stream', '?'):>3}  start {e['ts'] - t0:8.1f} us  "
              f"end {e['ts'] - t0 + e['dur']:8.1f} us  {e['name'][:70]}")


def profile(name: str, schedule: str, rows: int, iters: int, show_timeline: bool = False) -> None:
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from omnimoe.kernels import experts as ke

    d, inter, n, k, t = CONFIGS[name]
    torch.manual_seed(0)
    layer, x = bench_layer(d, inter, n, k, t)
    default = ke.use_dense
    ke.use_dense = _forced(schedule)
    try:
        with torch.inference_mode():
            graph, _ = capture_graph(lambda: layer(x))
            ms = statistics.median(event_times_ms(graph.replay, iters, 3))
            print(f"{name} schedule={schedule}: CUDA graph {ms:.3f} ms (median of {iters})", flush=True)
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    layer(x)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60),
                  flush=True)
            if show_timeline:
                timeline(graph.replay)
    finally:
        ke.use_dense = default


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="paper_min,paper_k2048,paper_k4096")
    ap.add_argument("--schedule", default="auto", choices=("auto", "grid", "dense"))
    ap.add_argument("--rows", type=int, default=14)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--timeline", action="store_true", help="also each kernel's start, end and stream in one forward")
    args = ap.parse_args()
    for name in args.configs.split(","):
        if name not in CONFIGS:
            print(f"unknown config {name!r}; one of {', '.join(CONFIGS)}", file=sys.stderr)
            return 2
    for name in args.configs.split(","):
        profile(name, args.schedule, args.rows, args.iters, args.timeline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
