#!/usr/bin/env python3
"""Whole-layer CUDA-graph (and eager) time per launch config of the fused shared-MLP kernel (what
swiglu.gated_mlp_config returns) and side stream priority: the shared MLP (main stream) and the
routed path (side stream) only overlap when their blocks fit on the SMs together, which the GEMM's
tiles, pipeline depth and program count decide. A star marks the layer's own choice.

    python3 scripts/sweep_layer_overlap.py [--configs readme,n65k,n1m]
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

# (BM, BN, BK, GROUP_M, num_warps, num_stages, programs_per_sm)
TILES = [(128, 128, 64, 16, 8, 3, 1), (64, 128, 64, 16, 4, 4, 1), (128, 128, 64, 16, 8, 3, 0), (64, 128, 64, 16, 4, 4, 0),
         (128, 64, 64, 8, 4, 3, 0), (128, 128, 64, 16, 8, 3, 0.5)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="readme,n65k,n1m")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--priorities", default="0", help="side stream priorities to try (-1: high; "
                    "H200: no difference measured at readme, n65k, n1m)")
    args = ap.parse_args()
    import torch

    from bench_layer import CONFIGS
    from omnimoe import layer as layer_mod
    from omnimoe.kernels import swiglu

    choose = swiglu.gated_mlp_config
    dev = torch.device("cuda")
    for name in args.configs.split(","):
        d, inter, n, k, t = CONFIGS[name]
        torch.manual_seed(0)
        layer, x = bench_layer(d, inter, n, k, t)
        default = choose(layer.config.grid_side)
        for priority in (int(p) for p in args.priorities.split(",")):
            layer_mod._SIDE_STREAMS[dev] = torch.cuda.Stream(dev, priority=priority)
            cells = []
            for bm, bn, bk, gm, nw, ns, per_sm in TILES:
                tile = dict(BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=nw, num_stages=ns, programs_per_sm=per_sm)
                swiglu.gated_mlp_config = lambda side, tile=tile: tile
                with torch.inference_mode():
                    graph, _ = capture_graph(lambda: layer(x))
                    ms = statistics.median(event_times_ms(graph.replay, args.iters, 5))
                    eager = statistics.median(event_times_ms(lambda: layer(x), args.iters, 5))
                star = "*" if tile == default and priority == 0 else ""
                cells.append(f"{bm}x{bn}x{bk}/g{gm}/w{nw}/s{ns}/p{per_sm}{star} {ms * 1e3:.1f} (eager {eager * 1e3:.1f})")
            print(f"{name} side priority {priority} (us): " + "  ".join(cells), flush=True)
        swiglu.gated_mlp_config = choose
        layer_mod._SIDE_STREAMS.pop(dev, None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
