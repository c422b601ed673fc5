#!/usr/bin/env python3
"""Eager-mode (host overhead) microbenchmark of the Triton inference path, bf16, on one GPU.

For each config: eager median ms (CUDA events around each call, no sync between calls, as in
scripts/bench_layer.py), host-only submission time per call (perf_counter over many calls, then
one sync), CUDA-graph replay ms, the plain torch dense MLP (3 GEMMs + act + mul) for scale, and
with --baseline FILE an older layer.py (loaded as a module, same weights) timed side by side.
"new" is the layer as it runs by default (decode CUDA graphs up to 64 tokens), "new_launch" the
same layer with decode_cuda_graphs=repeat_cuda_graphs=False. Also per-launch host costs: F.linear, torch.empty, a
Triton launch through kernel[grid], the layer's unchecked and the public expert launcher, a
side-stream round trip.

    python3 scripts/bench_eager.py [--configs decode_t1,decode_t64,readme] [--baseline old_layer.py] [--json out.json]

e.g. the layer before the launch-lean path: git show 8a64038:omnimoe/layer.py > old_layer.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import bench_layer, capture_graph, event_times_ms, host_us  # noqa: E402

from bench_layer import CONFIGS  # noqa: E402  (the design contract's configs, one table)

_SUBMODULES = ("gate_proj", "up_proj", "down_proj", "router_gate_x", "router_gate_y", "router_norm_x", "router_norm_y",
               "up_embed", "down_embed")


def _events(fn, iters, warmup=20):
    return statistics.median(event_times_ms(fn, iters, warmup))


def _graph_ms(fn, iters):
    g, _ = capture_graph(fn)
    ms = _events(g.replay, iters)
    del g
    return ms


def _load_baseline(path):
    """An older omnimoe/layer.py as a module (its relative imports made absolute)."""
    src = Path(path).read_text().replace("from . import ", "from omnimoe import ").replace("from .", "from omnimoe.")
    spec = importlib.util.spec_from_loader("omnimoe_baseline_layer", loader=None)
    mod = importlib.util.module_from_spec(spec)
    exec(compile(src, str(path), "exec"), mod.__dict__)
    return mod.OmniMoELayer


def launch_costs() -> dict:
    import torch
    import torch.nn.functional as F

    from omnimoe.kernels import experts as ke

    dev = torch.device("cuda")
    d, N, K = 1024, 4096, 16
    x = torch.randn(1, d, device=dev, dtype=torch.bfloat16)
    w = torch.randn(4096, d, device=dev, dtype=torch.bfloat16)
    up = torch.randn(N, d, device=dev, dtype=torch.bfloat16)
    g = torch.rand(1, K, device=dev)
    idx = torch.randint(0, N, (1, K), device=dev, dtype=torch.int32)
    y = torch.empty_like(x)
    meta = ke.token_centric_config(d, K, 0, False)
    side = torch.cuda.Stream()
    main = torch.cuda.current_stream()

    def side_trip():
        side.wait_stream(main)
        with torch.cuda.stream(side):
            pass
        main.wait_stream(side)

    n = 2000
    return {
        "F.linear_us": host_us(lambda: F.linear(x, w), n),
        "torch.empty_us": host_us(lambda: torch.empty((1, K), device=dev), n),
        "triton_kernel[grid]_us": host_us(lambda: ke._token_centric_kernel[(1,)](x, up, up, g, idx, y, d, K, N, **meta), n),
        "token_centric_fast_us": host_us(lambda: ke.token_centric_fast(x, up, up, g, idx, y, 0), n),
        "public_launcher_us": host_us(lambda: ke.expert_grouped_matmul_triton(x, up, up, g, idx, "silu", out=y), n),
        "side_stream_round_trip_us": host_us(side_trip, n),
    }


def run_config(name, baseline_cls, iters) -> dict:
    import torch
    import torch.nn.functional as F

    d, inter, n, k, t = CONFIGS[name]
    torch.manual_seed(0)
    layer, x = bench_layer(d, inter, n, k, t)
    cfg = layer.config
    impls = {"new": layer, "new_launch": layer}
    if baseline_cls is not None:
        old = baseline_cls(cfg, backend="triton", device="meta", dtype=torch.bfloat16).eval()
        for sub in _SUBMODULES:
            if hasattr(layer, sub):
                setattr(old, sub, getattr(layer, sub))
        impls["old"] = old
    res = {"name": name, "d": d, "I": inter, "N": n, "K": k, "T": t}
    host_iters = 200 if t <= 64 else 50
    with torch.inference_mode():
        y_new = layer(x)
        for key, m in impls.items():
            layer.decode_cuda_graphs = layer.repeat_cuda_graphs = key != "new_launch"
            y = m(x)
            res[f"{key}_rel_diff_vs_new"] = float((y.float() - y_new.float()).norm() / y_new.float().norm())
            res[f"{key}_eager_ms"] = _events(lambda: m(x), iters)
            res[f"{key}_host_us"] = host_us(lambda: m(x), host_iters)
            res[f"{key}_graph_ms"] = _graph_ms(lambda: m(x), iters)
        wg, wu, wd = layer.gate_proj.weight, layer.up_proj.weight, layer.down_proj.weight
        dense = lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)  # noqa: E731
        res["dense_torch_eager_ms"] = _events(dense, iters)
        res["dense_torch_host_us"] = host_us(dense, host_iters)
    del layer, impls
    torch.cuda.empty_cache()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="decode_t1,decode_t64,readme")
    ap.add_argument("--baseline", help="an older omnimoe/layer.py to time side by side")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--json")
    args = ap.parse_args()
    import torch
    import triton

    baseline = _load_baseline(args.baseline) if args.baseline else None
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "command": " ".join(sys.argv), "configs": []}
    out["launch_costs"] = launch_costs()
    print(json.dumps(out["launch_costs"]), flush=True)
    for name in args.configs.split(","):
        r = run_config(name, baseline, args.iters)
        print(json.dumps(r), flush=True)
        out["configs"].append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    cols = ["new_eager_ms", "new_launch_eager_ms", "old_eager_ms", "new_host_us", "new_launch_host_us", "old_host_us",
            "new_graph_ms", "old_graph_ms", "dense_torch_eager_ms", "new_launch_rel_diff_vs_new", "old_rel_diff_vs_new"]
    print("| config | " + " | ".join(cols) + " |")
    for r in out["configs"]:
        print(f"| {r['name']} | " + " | ".join(f"{r[c]:.4g}" if c in r else "-" for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
