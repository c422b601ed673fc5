#!/usr/bin/env python3
"""The dense schedule from the router's rule (kernels/dense_rule.py) against the one from its pair
list (experts._dense_launch) at a SPEC §7 config: the routers alone, the rule pass per tile shape,
both schedules' routed experts (router excluded) and the whole layer's CUDA graph.

    python3 scripts/sweep_dense_rule.py [--config paper_k4096] [--iters 20]
        [--tiles "16x64x4:pf;32x64x4:f"]   (rows x columns x warps of the rule pass; p: prefetch, f: fast act, b: grid (column blocks, T))
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import bench_layer, capture_graph, event_times_ms  # noqa: E402
from bench_layer import CONFIGS  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="paper_k4096")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tiles", default="32x64x4:pf;32x64x4:pfb;16x64x4:pfb;64x64x4:pfb;32x64x8:pfb;32x128x4:pfb;16x128x4:pfb")
    args = ap.parse_args()
    if args.config not in CONFIGS:
        print(f"unknown config {args.config!r}; one of {', '.join(CONFIGS)}", file=sys.stderr)
        return 2
    try:
        tiles = []
        for tile in args.tiles.split(";"):
            shape, _, flags = tile.partition(":")
            tiles.append((*(int(v) for v in shape.split("x")), flags))
            assert len(tiles[-1]) == 4 and set(flags) <= set("pfb")
    except (ValueError, AssertionError):
        print(f"--tiles takes rows x columns x warps separated by ';', got {args.tiles!r}", file=sys.stderr)
        return 2
    import torch

    from omnimoe.kernels import dense_rule
    from omnimoe.kernels import experts as ke
    from omnimoe.kernels import router as kr

    d, inter, n, k, t = CONFIGS[args.config]
    torch.manual_seed(0)
    layer, x = bench_layer(d, inter, n, k, t)
    up, down = layer.up_embed.weight, layer.down_embed.weight
    s = layer.config.grid_side
    y = torch.empty_like(x)

    def ms(fn):
        return statistics.median(event_times_ms(fn, args.iters, 3))

    with torch.inference_mode():
        lp = layer._router_log_probs_fast(x)
        px, py = lp[:, :s], lp[:, s:]
        theta, e_star = kr.product_key_threshold_triton(px, py, k)
        gates, indices = kr.product_key_topk_triton(px, py, k, "product", sort=False)
        print(f"{args.config}: routers  pairs {ms(lambda: kr.product_key_topk_triton(px, py, k, 'product', sort=False)):.3f} ms"
              f"  rule {ms(lambda: kr.product_key_threshold_triton(px, py, k)):.3f} ms", flush=True)
        print(f"  cuBLAS x up^T alone {ms(lambda: torch.mm(x, up.t())):.3f} ms", flush=True)
        ke._dense_launch(x, up, down, gates, indices, 0, y)
        y_pairs = y.clone()
        print(f"  experts from pairs (zero, 2 GEMMs, scatter) {ms(lambda: ke._dense_launch(x, up, down, gates, indices, 0, y)):.3f} ms",
              flush=True)
        h = torch.mm(x, up.t())
        s_copy = h.clone()
        copy_ms = ms(lambda: h.copy_(s_copy))
        print(f"  copy of S (subtracted below) {copy_ms:.3f} ms", flush=True)
        for rows, cols, warps, flags in tiles:
            meta = dense_rule.rule_pass_config(rows, cols, warps, prefetch="p" in flags, fast="f" in flags,
                                               blocks_first="b" in flags)

            def rule_pass():
                h.copy_(s_copy)  # the pass works in place
                dense_rule._dense_rule_kernel[dense_rule.rule_pass_grid(t, s, meta)](h, lp, theta, e_star, s, lp.stride(0), ACT=0, **meta)

            dense_rule.dense_rule_launch(x, up, down, lp, theta, e_star, 0, y, meta)
            diff = float((y.float() - y_pairs.float()).norm() / y_pairs.float().norm())
            print(f"  rule pass {rows}x{cols} {warps} warps {flags or '-'}: {ms(rule_pass) - copy_ms:.3f} ms; experts from the rule "
                  f"(2 GEMMs, pass) {ms(lambda: dense_rule.dense_rule_launch(x, up, down, lp, theta, e_star, 0, y, meta)):.3f} ms"
                  f" (rel diff vs pairs {diff:.1e})", flush=True)
        applies = dense_rule.rule_applies
        for label, rule in (("rule", True), ("pairs", False)):
            dense_rule.rule_applies = applies if rule else (lambda *a: False)
            try:
                graph, _ = capture_graph(lambda: layer(x))
                print(f"  whole layer, CUDA graph, {label}: {ms(graph.replay):.3f} ms", flush=True)
                del graph
            finally:
                dense_rule.rule_applies = applies
    return 0


if __name__ == "__main__":
    sys.exit(main())
