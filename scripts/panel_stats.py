#!/usr/bin/env python3
"""How the grid-line schedule (omnimoe/kernels/grid_row.py) splits a paper-scale routing, counted
on the CPU: panels per token, token slots per panel and work items per block size (rows filled).
Routing: the exact top-K (ops.product_key_topk_reference) of log-softmaxed bf16-rounded unit-scale
random logits, as bench_layer's router gives them; pairs go to the row or column panel holding
more of their token's pairs (rows on ties), as the schedule assigns them (P = 1 panel per line);
and the lines per token of the rule path (grid_row.rule_launch).

    python3 scripts/panel_stats.py [--k 512] [--tokens 4096] [--side 320] [--bms 64,128,256]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument("--bms", default="64,128,256")
    args = ap.parse_args()
    T, s, K = args.tokens, args.side, args.k
    if not (0 < K <= s * s and T > 0 and s > 0):
        print("need 0 < k <= side^2 and positive tokens and side", file=sys.stderr)
        return 2
    import torch

    from omnimoe import ops

    torch.manual_seed(0)
    px = torch.log_softmax(torch.randn(T, s).bfloat16().float(), -1)
    py = torch.log_softmax(torch.randn(T, s).bfloat16().float(), -1)
    idx = torch.cat([ops.product_key_topk_reference(px[a:a + 256], py[a:a + 256], K, "product")[1].long()
                     for a in range(0, T, 256)])
    rows, cols = idx // s, idx % s
    rc = torch.zeros(T, s, dtype=torch.long).scatter_add_(1, rows, torch.ones_like(rows))
    cc = torch.zeros(T, s, dtype=torch.long).scatter_add_(1, cols, torch.ones_like(cols))
    panel = torch.where(rc.gather(1, rows) >= cc.gather(1, cols), rows, s + cols)
    pairs = torch.zeros(T, 2 * s, dtype=torch.long).scatter_add_(1, panel, torch.ones_like(panel))
    slots = (pairs > 0).sum(0)
    print(f"K={K}, T={T}, s={s}: panels per token {float((pairs > 0).sum(1).float().mean()):.1f}; token slots per "
          f"panel mean {float(slots.float().mean()):.1f}, min {int(slots.min())}, max {int(slots.max())}")
    for bm in (int(v) for v in args.bms.split(",")):
        items = int(((slots + bm - 1) // bm).sum())
        print(f"  {bm} slots per block: {items} work items, rows filled {int(slots.sum()) / (items * bm):.2f}")
    # The rule path (grid_row._gr_rule_route_kernel): rank rows a < A and rank columns b < w(A),
    # w(A) = 1 + the largest y rank of a winner in x ranks >= A, A <= isqrt(K) minimising A + w(A).
    xr = torch.argsort(torch.argsort(-px, dim=1, stable=True), dim=1).gather(1, rows)
    yr = torch.argsort(torch.argsort(-py, dim=1, stable=True), dim=1).gather(1, cols)
    big = torch.iinfo(torch.long).min
    lines = torch.stack([A + (torch.where(xr >= A, yr, big).max(1).values + 1).clamp_min(0)
                         for A in range(min(s, math.isqrt(K)) + 1)]).min(0).values
    print(f"  rule path: lines per token {float(lines.float().mean()):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
