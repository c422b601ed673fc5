#!/usr/bin/env python3
"""Routed-expert schedules alone (token, hybrid, dense, grid-row variants) at SPEC §7 shapes, bf16.

Routing: "product" (default) is what scripts/bench_common.bench_layer gives the layer: unit-scale
router logits, log-softmax per axis, exact product-key top-K with product gates; "uniform" draws K
distinct experts per token. Timings are medians of CUDA-event times over preallocated out and
workspace; accuracy is each schedule's bf16 output against float32 arithmetic (fp32 copies of the
same bf16 tables) on the first 128 tokens, next to a PEER-style bf16 computation of the same
routing. `--fp32-check` also runs the grid-row schedule on fp32 inputs (IEEE dots).

    python3 scripts/bench_schedules.py [--configs paper_min,paper_k2048,paper_k4096]
        [--schedules token,hybrid,dense,grid] [--grid-variants "a:BM=64;b:BM=128,HSCR=1,CG=1"]
        [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import event_times_ms, expert_tables, product_routing  # noqa: E402

CONFIGS = {  # name: (d, N, K, T)
    "readme": (1024, 4096, 16, 4096),
    "n65k": (1024, 65536, 16, 4096),
    "paper_min": (1024, 102400, 512, 4096),
    "paper_k1024": (1024, 102400, 1024, 4096),
    "paper_k2048": (1024, 102400, 2048, 4096),
    "paper_k4096": (1024, 102400, 4096, 4096),
    "tiny": (32, 1024, 40, 100),  # CPU smoke test under TRITON_INTERPRET=1 (--device cpu)
}
DEVICE = "cuda"


def _events(fn, iters, warmup=2):
    if DEVICE == "cpu":
        fn()
        return float("nan")
    return statistics.median(event_times_ms(fn, iters, warmup))


def _routing(kind, T, N, K, dev):
    import math

    import torch

    if kind == "uniform":
        idx = torch.rand(T, N, device=dev).topk(K, dim=1).indices.to(torch.int32)
        return torch.rand(T, K, device=dev) / K, idx
    return product_routing(T, math.isqrt(N), K, dev)


def _panels_per_token(idx, s, P, pwr) -> float:
    """Mean panels per token the grid schedule multiplies: each pair in its row panel or its column
    panel, whichever holds more of the token's pairs (grid_row._gr_key; rows on ties)."""
    import torch

    i, j = idx // s, idx % s
    row_key, col_key = i * P + j // pwr, s * P + j * P + i // pwr
    counts = torch.zeros(idx.shape[0], 2 * s * P, dtype=torch.int32, device=idx.device)
    one = torch.ones_like(row_key, dtype=torch.int32)
    counts.scatter_add_(1, row_key, one).scatter_add_(1, col_key, one)
    key = torch.where(counts.gather(1, row_key) >= counts.gather(1, col_key), row_key, col_key)
    used = torch.zeros_like(counts).scatter_(1, key, 1)
    return float(used.sum(1).float().mean())


def _set_grid(spec):
    from omnimoe.kernels import grid_row as gr

    for item in filter(None, spec.split(",")):
        k, v = item.split("=")
        setattr(gr, "GR_" + k.strip().upper(), int(v))


def run(name, iters, schedules, grid_variants, routing, fp32_check):
    import torch

    from omnimoe import ops
    from omnimoe.kernels import experts as ke
    from omnimoe.kernels import grid_row as gr

    d, N, K, T = CONFIGS[name]
    torch.manual_seed(0)
    dev = torch.device(DEVICE)
    x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
    up, down = expert_tables(N, d, dev)
    gates, idx = _routing(routing, T, N, K, dev)
    res = {"name": name, "d": d, "N": N, "K": K, "T": T, "routing": routing}
    s, P, pwr, _ = gr.panel_geometry(N)
    rows = (idx.long() // s).sort(1).values
    res["rows_per_token"] = float(((rows[:, 1:] != rows[:, :-1]).sum(1) + 1).float().mean())
    res["panels_per_token"] = _panels_per_token(idx.long(), s, P, pwr)
    res["grid_gflop"] = 4 * T * res["panels_per_token"] * pwr * d / 1e9
    sub = slice(0, 128)
    up32, down32 = up.float(), down.float()
    y32 = ops.expert_grouped_matmul_reference(x[sub].float(), up32, down32, gates[sub], idx[sub], "silu")
    out = torch.empty(T, d, device=dev, dtype=torch.bfloat16)

    def check(tag, fn):
        out.fill_(float("nan"))
        fn()
        y = out[sub].float()
        res[f"{tag}_rel_err_vs_fp32"] = float((y - y32).norm() / y32.norm())
        res[f"{tag}_all_finite"] = bool(torch.isfinite(out).all())
        res[f"{tag}_ms"] = _events(fn, iters)

    for sched in schedules:
        if sched == "dense":
            check("dense", lambda: ke._dense_launch(x, up, down, gates, idx, 0, out))
        elif sched in ("token", "hybrid", "expert"):
            ws = torch.empty(ke.expert_workspace_bytes(T, K, N, d), device=dev, dtype=torch.uint8)
            check(sched, lambda sc=sched: ke.expert_grouped_matmul_triton(x, up, down, gates, idx, "silu", out=out,
                                                                           workspace=ws, schedule=sc))
        elif sched == "grid":
            for vname, spec in grid_variants:
                saved = {k: getattr(gr, k) for k in dir(gr) if k.startswith("GR_")}
                try:
                    _set_grid(spec)
                    ws = torch.empty(gr.workspace_bytes(T, K, N, d), device=dev, dtype=torch.uint8)
                    try:
                        check(f"grid_{vname}", lambda: gr.launch(x, up, down, gates, idx, out, ws, 0))
                        res[f"grid_{vname}_sort_ms"] = _events(
                            lambda: gr.launch(x, up, down, gates, idx, out, ws, 0, sort_only=True), iters)
                    except Exception as e:  # noqa: BLE001 - report and go on with the next variant
                        res[f"grid_{vname}_error"] = f"{type(e).__name__}: {e}"[:300]
                finally:
                    for k, v in saved.items():
                        setattr(gr, k, v)
    if fp32_check:
        try:
            outf = torch.empty(T, d, device=dev)
            ke.expert_grouped_matmul_triton(x.float(), up32, down32, gates, idx, "silu", out=outf, schedule="grid")
            res["grid_fp32_rel_err"] = float((outf[sub] - y32).norm() / y32.norm())
        except Exception as e:  # noqa: BLE001
            res["grid_fp32_error"] = f"{type(e).__name__}: {e}"[:300]
    # PEER-style bf16 arithmetic on the same routing, for the error yardstick.
    xs, e = x[sub], idx[sub].long()
    h = torch.nn.functional.silu(torch.einsum("tkd,td->tk", up[e], xs)) * gates[sub].to(xs.dtype)
    yp = torch.einsum("tk,tkd->td", h, down[e])
    res["peer_arith_rel_err_vs_fp32"] = float((yp.float() - y32).norm() / y32.norm())
    res["dense_flop_ms_at_790T"] = 4 * T * N * d / 790e12 * 1e3
    res["grid_flop_ms_at_790T"] = res["grid_gflop"] / 790e3 * 1e3
    return res


def _meta(args) -> dict:
    """What a committed result needs beside its numbers: GPU, versions, date, the command."""
    import datetime
    import platform

    import torch
    import triton

    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3"] + sys.argv),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="paper_min,paper_k2048,paper_k4096")
    ap.add_argument("--schedules", default="hybrid,dense,grid")
    ap.add_argument("--grid-variants", default="default:", help="name:KEY=V,KEY=V;... (grid_row.GR_KEY)")
    ap.add_argument("--routing", default="product", choices=("product", "uniform"))
    ap.add_argument("--fp32-check", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    variants = [tuple(v.split(":", 1)) for v in args.grid_variants.split(";") if v]
    out = []
    for name in args.configs.split(","):
        r = run(name, args.iters, args.schedules.split(","), variants, args.routing, args.fp32_check)
        print(json.dumps(r), flush=True)
        out.append(r)
        if args.json:
            Path(args.json).write_text(json.dumps({"meta": _meta(args), "results": out}, indent=1) + "\n")
    print()
    for r in out:
        ms = "  ".join(f"{k[:-3]}={r[k]:.3f}" for k in r if k.endswith("_ms"))
        err = "  ".join(f"{k[:-len('_rel_err_vs_fp32')]}={r[k]:.2e}" for k in r if k.endswith("_rel_err_vs_fp32"))
        print(f"{r['name']} rows={r['rows_per_token']:.0f} panels={r['panels_per_token']:.1f}: {ms}\n    err: {err}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
