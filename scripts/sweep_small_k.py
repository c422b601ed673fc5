#!/usr/bin/env python3
"""Launch configurations of the two per-token kernels at K = 16 (readme / n65k / n1m shapes, T tokens,
bf16, each replayed as a CUDA graph): the layer's fused small-K router tail
(`_router_logits_topk_small_kernel`) per num_warps, and the token-centric experts
(`_token_centric_kernel`) per (rows per step BLOCK_K, num_warps). A star marks what
`router_logits_kernel_config` / `token_centric_config` pick for that many tokens.

    python3 scripts/sweep_small_k.py [--sides 64,256,1024] [--tokens 4096]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import capture_graph, event_times_ms, expert_tables, product_routing  # noqa: E402

TOKEN_CONFIGS = ((16, 8), (16, 4), (8, 4), (8, 8), (4, 4), (4, 2), (2, 4))  # (BLOCK_K, num_warps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="64,256,1024")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    import torch

    from omnimoe.kernels import experts as ke
    from omnimoe.kernels import router as kr
    from omnimoe.kernels._launch import MANY_TOKENS

    T, d, K = args.tokens, 1024, 16
    many = T >= MANY_TOKENS
    med = lambda fn: statistics.median(event_times_ms(capture_graph(fn)[0].replay, args.iters, 3))  # noqa: E731
    for s in (int(v) for v in args.sides.split(",")):
        torch.manual_seed(0)
        N = s * s
        logits = torch.randn(T, 2 * s, device="cuda", dtype=torch.bfloat16)
        gates = torch.empty(T, K, device="cuda")
        idx = torch.empty(T, K, device="cuda", dtype=torch.int32)
        picked = kr.router_logits_kernel_config(s, K, "product", False, many)
        row = []
        for w in (1, 2, 4, 8):
            meta = dict(picked, num_warps=w)
            ms = med(lambda: kr._router_logits_topk_small_kernel[(T,)](
                logits, logits, logits, gates, idx, s, K, min(K, s), logits.stride(0), **meta))
            row.append(f"w{w}{'*' if w == picked['num_warps'] else ''} {ms * 1e3:.1f}")
        print(f"s={s} router (us): " + "  ".join(row), flush=True)
        x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
        up, down = expert_tables(N, d, "cuda")
        g, i = product_routing(T, s, K, "cuda")
        out = torch.empty_like(x)
        picked = ke.token_centric_config(d, K, 0, False, many)
        row = []
        for bk, w in TOKEN_CONFIGS:
            meta = dict(picked, BLOCK_K=bk, num_warps=w)
            ms = med(lambda: ke._token_centric_kernel[(T,)](x, up, down, g, i, out, d, K, N, **meta))
            star = "*" if (bk, w) == (picked["BLOCK_K"], picked["num_warps"]) else ""
            row.append(f"k{bk}w{w}{star} {ms * 1e3:.1f}")
        print(f"s={s} token-centric (us): " + "  ".join(row), flush=True)

    return 0


if __name__ == "__main__":
    sys.exit(main())
