#!/usr/bin/env python3
"""Routed-expert schedules alone (token, hybrid, dense) at SPEC §7 shapes, bf16, one GPU.

Routing is drawn uniformly (distinct experts per token, random gates) so no router variant needs
compiling; timings are medians of CUDA-event times; accuracy is each schedule's bf16 output
against float32 on the same weights and routing (first 128 tokens).

    python3 scripts/bench_schedules.py [--configs paper_min,paper_k2048,paper_k4096,readme] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import event_times_ms  # noqa: E402

CONFIGS = {  # name: (d, N, K, T)
    "readme": (1024, 4096, 16, 4096),
    "n65k": (1024, 65536, 16, 4096),
    "paper_min": (1024, 102400, 512, 4096),
    "paper_k1024": (1024, 102400, 1024, 4096),
    "paper_k2048": (1024, 102400, 2048, 4096),
    "paper_k4096": (1024, 102400, 4096, 4096),
}


def _events(fn, iters, warmup=2):
    return statistics.median(event_times_ms(fn, iters, warmup))


def run(name, iters, schedules):
    import torch

    from omnimoe import ops
    from omnimoe.kernels import expert_grouped_matmul_triton
    from omnimoe.kernels.experts import expert_dense_matmul

    d, N, K, T = CONFIGS[name]
    torch.manual_seed(0)
    dev = torch.device("cuda")
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    up = (torch.randn(N, d, device=dev) * d**-0.5).to(torch.bfloat16)
    down = (torch.randn(N, d, device=dev) * d**-0.5).to(torch.bfloat16)
    idx = torch.rand(T, N, device=dev).topk(K, dim=1).indices.to(torch.int32)
    gates = torch.rand(T, K, device=dev) / K
    fns = {
        "token": lambda: expert_grouped_matmul_triton(x, up, down, gates, idx, "silu", schedule="token"),
        "hybrid": lambda: expert_grouped_matmul_triton(x, up, down, gates, idx, "silu", schedule="hybrid"),
        "dense": lambda: expert_dense_matmul(x, up, down, gates, idx, "silu"),
    }
    sub = slice(0, 128)
    y32 = ops.expert_grouped_matmul_reference(x[sub].float(), up, down, gates[sub], idx[sub], "silu")
    res = {"name": name, "d": d, "N": N, "K": K, "T": T}
    for sched in schedules:
        y = fns[sched]()
        res[f"{sched}_rel_err_vs_fp32"] = float((y[sub].float() - y32).norm() / y32.norm())
        res[f"{sched}_ms"] = _events(fns[sched], iters)
    # PEER-style bf16 arithmetic on the same routing, for the error yardstick.
    xs, e = x[sub], idx[sub].long()
    h = torch.nn.functional.silu(torch.einsum("tkd,td->tk", up[e], xs)) * gates[sub].to(xs.dtype)
    yp = torch.einsum("tk,tkd->td", h, down[e])
    res["peer_arith_rel_err_vs_fp32"] = float((yp.float() - y32).norm() / y32.norm())
    res["dense_flop_ms_at_790T"] = 4 * T * N * d / 790e12 * 1e3
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="paper_min,paper_k2048,paper_k4096,readme")
    ap.add_argument("--schedules", default="token,hybrid,dense")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    out = []
    for name in args.configs.split(","):
        r = run(name, args.iters, args.schedules.split(","))
        print(json.dumps(r), flush=True)
        out.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
