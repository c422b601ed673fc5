"""Router (product-key top-K, K > 64) microbenchmarks on a GPU: the pre-issue-11 kernel (kept here,
phase-split by a STAGE constexpr) side by side with omnimoe.kernels.router, plus probes of the
building blocks (bitonic tl.sort of K int64 per program). CUDA events, median of --iters.

  PYTHONPATH=$PWD python3 scripts/bench_router.py [--probe] [--check] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
import triton
import triton.language as tl

from omnimoe import ops
from omnimoe.kernels import router


# ----------------------------------------------------------------- the old kernel (HEAD before issue 11)
@triton.jit
def _old_count_ge(xs, rowlen, ys_ptr, theta, STEPS: tl.constexpr):
    lo = tl.zeros_like(rowlen)
    hi = rowlen
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        yv = tl.load(ys_ptr + mid, mask=active, other=0.0)
        ge = router._f32_key(xs + yv).to(tl.int64) >= theta
        lo = tl.where(active & ge, mid + 1, lo)
        hi = tl.where(active & (~ge), mid, hi)
    return lo


@triton.jit
def _old_row_of(j, incl_ptr, KA, STEPS: tl.constexpr):
    lo = tl.zeros_like(j)
    hi = tl.zeros_like(j) + KA
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        p = tl.load(incl_ptr + mid, mask=active, other=0)
        gt = p > j
        lo = tl.where(active & (~gt), mid + 1, lo)
        hi = tl.where(active & gt, mid, hi)
    prev = tl.load(incl_ptr + lo - 1, mask=lo > 0, other=0)
    return lo, j - prev


@triton.jit
def _old_tie_expert(j, xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, KA, STEPS_A: tl.constexpr):
    a, off = _old_row_of(j, q_ptr, KA, STEPS_A)
    b = tl.load(g_ptr + a) + off
    e = tl.load(xi_ptr + a) * s + tl.load(yi_ptr + b)
    v = tl.load(xv_ptr + a) + tl.load(yv_ptr + b)
    return e, v


@triton.jit
def _old_kernel(
    px_ptr, py_ptr, gates_ptr, idx_ptr, wsf_ptr, wsi_ptr,
    s, K, KA, stride_px, stride_py,
    SOFTMAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, STEPS_A: tl.constexpr, STEPS_N: tl.constexpr, STAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    base = t * (7 * KA)
    xv_ptr = wsf_ptr + base
    yv_ptr = xv_ptr + KA
    xi_ptr = wsi_ptr + base + 2 * KA
    yi_ptr = xi_ptr + KA
    p_ptr = xi_ptr + 2 * KA
    q_ptr = xi_ptr + 3 * KA
    g_ptr = xi_ptr + 4 * KA
    out_g = gates_ptr + t * K
    out_i = idx_ptr + t * K
    router._sort_axis(px_ptr + t * stride_px, s, xv_ptr, xi_ptr, KA, BLOCK_S)
    router._sort_axis(py_ptr + t * stride_py, s, yv_ptr, yi_ptr, KA, BLOCK_S)
    tl.debug_barrier()
    if STAGE >= 2:
        rows = tl.arange(0, BLOCK_A)
        rmask = rows < KA
        xs = tl.load(xv_ptr + rows, mask=rmask, other=float("-inf"))
        rowlen = tl.where(rmask, tl.minimum(K // (rows + 1), KA), 0)
        lo = router._f32_key(tl.load(xv_ptr + KA - 1) + tl.load(yv_ptr + KA - 1)).to(tl.int64)
        hi = router._f32_key(tl.load(xv_ptr) + tl.load(yv_ptr)).to(tl.int64) + 1
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            c = tl.sum(_old_count_ge(xs, rowlen, yv_ptr, mid, STEPS_A), axis=0)
            ok = c >= K
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        theta = lo
        if STAGE == 2:
            tl.store(out_i, theta.to(tl.int32))
        if STAGE >= 3:
            cnt_ge = _old_count_ge(xs, rowlen, yv_ptr, theta, STEPS_A)
            cnt_gt = _old_count_ge(xs, rowlen, yv_ptr, theta + 1, STEPS_A)
            total_ge = tl.sum(cnt_ge, axis=0)
            n_gt = tl.sum(cnt_gt, axis=0)
            overflow = total_ge > K
            emit = tl.where(overflow, cnt_gt, cnt_ge)
            n_emit = tl.where(overflow, n_gt, total_ge)
            tl.store(p_ptr + rows, tl.cumsum(emit, axis=0), mask=rmask)
            tl.store(q_ptr + rows, tl.cumsum(cnt_ge - cnt_gt, axis=0), mask=rmask)
            tl.store(g_ptr + rows, cnt_gt, mask=rmask)
            tl.debug_barrier()
            lanes = tl.arange(0, CHUNK)
            for o0 in range(0, n_emit, CHUNK):
                o = o0 + lanes
                om = o < n_emit
                a, b = _old_row_of(o, p_ptr, KA, STEPS_A)
                v = tl.load(xv_ptr + a, mask=om, other=0.0) + tl.load(yv_ptr + b, mask=om, other=0.0)
                e = tl.load(xi_ptr + a, mask=om, other=0) * s + tl.load(yi_ptr + b, mask=om, other=0)
                tl.store(out_g + o, v, mask=om)
                tl.store(out_i + o, e, mask=om)
            if overflow:
                need = K - n_gt
                n_tie = total_ge - n_gt
                elo = tl.zeros_like(n_tie)
                ehi = tl.zeros_like(n_tie) + s * s
                for _ in range(STEPS_N):
                    emid = (elo + ehi) // 2
                    c = tl.zeros_like(n_tie)
                    for j0 in range(0, n_tie, CHUNK):
                        j = j0 + lanes
                        jm = j < n_tie
                        e, v = _old_tie_expert(tl.where(jm, j, 0), xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, KA, STEPS_A)
                        c += tl.sum((jm & (e < emid)).to(tl.int32), axis=0)
                    ok = c >= need
                    ehi = tl.where(ok, emid, ehi)
                    elo = tl.where(ok, elo, emid + 1)
                e_star = elo
                written = n_gt
                for j0 in range(0, n_tie, CHUNK):
                    j = j0 + lanes
                    jm = j < n_tie
                    e, v = _old_tie_expert(tl.where(jm, j, 0), xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, KA, STEPS_A)
                    sel = jm & (e < e_star)
                    pos = written + tl.cumsum(sel.to(tl.int32), axis=0) - 1
                    tl.store(out_g + pos, v, mask=sel)
                    tl.store(out_i + pos, e, mask=sel)
                    written += tl.sum(sel.to(tl.int32), axis=0)
            tl.debug_barrier()
            if STAGE >= 4:
                ko = tl.arange(0, BLOCK_K)
                km = ko < K
                v = tl.load(out_g + ko, mask=km, other=0.0)
                e = tl.load(out_i + ko, mask=km, other=0)
                packed = (router._f32_key(v).to(tl.int64) << 32) | (0x7FFFFFFF - e).to(tl.int64)
                packed = tl.where(km, packed, -9223372036854775807 - 1)
                packed = tl.sort(packed, descending=True)
                score = router._key_f32((packed >> 32).to(tl.int32))
                e = 0x7FFFFFFF - (packed & 0xFFFFFFFF).to(tl.int32)
                tl.store(out_g + ko, router._gates_of(score, km, SOFTMAX), mask=km)
                tl.store(out_i + ko, e, mask=km)


def old_topk(px, py, K, gate, stage=4):
    T, s = px.shape
    ka = min(K, s)
    block_k = max(16, triton.next_power_of_2(K))
    meta = dict(SOFTMAX=gate == "softmax", BLOCK_S=max(16, triton.next_power_of_2(s)),
                BLOCK_A=max(16, triton.next_power_of_2(ka)), BLOCK_K=block_k, CHUNK=min(block_k, 512),
                STEPS_A=max(1, math.ceil(math.log2(ka + 1))), STEPS_N=max(1, math.ceil(math.log2(s * s + 1))),
                num_warps=4 if max(block_k, triton.next_power_of_2(s)) <= 256 else 8)
    g = torch.empty(T, K, device=px.device)
    i = torch.empty(T, K, device=px.device, dtype=torch.int32)
    ws = torch.empty(T * 7 * ka, device=px.device, dtype=torch.int32)

    def run():
        _old_kernel[(T,)](px, py, g, i, ws.view(torch.float32), ws, s, K, ka, s, s, STAGE=stage, **meta)
        return g, i
    return run


# ----------------------------------------------------------------------------------------- probes
@triton.jit
def _sort_probe(x_ptr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, ROWS)[:, None]
    c = tl.arange(0, BLOCK // ROWS)[None, :]
    off = t * BLOCK + r * (BLOCK // ROWS) + c
    v = tl.load(x_ptr + off)
    v = tl.sort(v, descending=True)
    tl.store(x_ptr + off, v)


def timeit(fn, iters):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


def inputs(T, s, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    px = torch.log_softmax(2 * torch.randn(T, s, device="cuda", generator=g), -1)
    py = torch.log_softmax(2 * torch.randn(T, s, device="cuda", generator=g), -1)
    return px, py


def new_topk(px, py, K, gate, num_warps=None):
    """The current launcher (num_warps=None) or its large-K kernel at another num_warps."""
    T, s = px.shape
    g = torch.empty(T, K, device=px.device)
    i = torch.empty(T, K, device=px.device, dtype=torch.int32)
    ws = torch.empty(max(1, router.topk_workspace_bytes(T, s, K)), device=px.device, dtype=torch.uint8)
    if num_warps is None:
        return lambda: router.product_key_topk_triton(px, py, K, gate, gates_out=g, indices_out=i, workspace=ws)
    kernel, meta = router.topk_kernel_config(s, K, gate)
    meta = dict(meta, num_warps=num_warps)
    wsi = ws.view(torch.int32)

    def run():
        kernel[(T,)](px, py, g, i, wsi.view(torch.float32), wsi, s, K, min(K, s), s, s, **meta)
        return g, i
    return run


def variant_fn(name, px, py, K, gate):
    if name == "old":
        return old_topk(px, py, K, gate)
    if name == "new":
        return new_topk(px, py, K, gate)
    return new_topk(px, py, K, gate, num_warps=int(name[len("new_w"):]))


CONFIGS = [(320, 512), (320, 2048), (320, 4096), (1024, 128), (1024, 1024), (1024, 4096)]
# (s, K, gate) the GPU tests launch (compiled ahead by --warm too).
TEST_CONFIGS = [(64, 4096, "softmax"), (320, 512, "product"), (320, 2048, "softmax"), (1024, 4096, "product"),
                (32, 100, "softmax")]


def compile_one(spec):
    s, K, gate, name = spec.split(":")
    s, K = int(s), int(K)
    px, py = inputs(2, s)
    variant_fn(name, px, py, K, gate)()
    torch.cuda.synchronize()


def warm(specs, jobs=14):
    """Compile every (config, variant) in parallel processes (the Triton disk cache is shared)."""
    import subprocess
    t0 = time.time()
    procs, pending = [], list(specs)
    while pending or procs:
        while pending and len(procs) < jobs:
            sp = pending.pop(0)
            procs.append((sp, subprocess.Popen([sys.executable, __file__, "--compile-one", sp])))
        time.sleep(0.2)
        for sp, pr in list(procs):
            if pr.poll() is not None:
                procs.remove((sp, pr))
                if pr.returncode:
                    print(f"compile {sp} failed ({pr.returncode})", flush=True)
    print(f"warm: {len(specs)} kernels in {time.time() - t0:.1f}s", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--probe", action="store_true", help="old kernel phase split + sort probes")
    ap.add_argument("--no-old", action="store_true")
    ap.add_argument("--check", type=int, default=256, help="tokens compared with the reference (0: none)")
    ap.add_argument("--configs", default=",".join(f"{s}:{k}" for s, k in CONFIGS))
    ap.add_argument("--variants", default="old,new", help="old, new, new_wN (large-K kernel at num_warps N)")
    ap.add_argument("--extra", default="", help="s:K:variant,... timed besides --configs x --variants")
    ap.add_argument("--warm", action="store_true", help="compile all kernels first, in parallel processes")
    ap.add_argument("--compile-one")
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.compile_one:
        return compile_one(a.compile_one)
    T = a.tokens
    plan = [(int(s), int(k), v) for s, k in (c.split(":") for c in a.configs.split(",")) for v in a.variants.split(",")]
    plan += [(int(s), int(k), v) for s, k, v in (e.split(":") for e in a.extra.split(",") if e)]
    if a.warm:
        warm([f"{s}:{k}:product:{v}" for s, k, v in plan] + [f"{s}:{k}:{g}:new" for s, k, g in TEST_CONFIGS])
    if not a.probe:
        res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, T=T, rows=[])
        by_cfg = {}
        for s, K, v in plan:
            by_cfg.setdefault((s, K), []).append(v)
        for (s, K), vs in by_cfg.items():
            px, py = inputs(T, s, seed=s + K)
            row = dict(s=s, K=K)
            if a.check:
                n = min(a.check, T)
                gr, ir = ops.product_key_topk_reference(px[:n], py[:n], K, "product")
            for v in vs:
                run = variant_fn(v, px, py, K, "product")
                row[f"{v}_ms"] = round(timeit(run, a.iters), 4)
                if a.check:
                    g, i = run()
                    row[f"{v}_exact"] = f"{int((i[:n] == ir).all(1).sum())}/{n}"
                    row[f"{v}_gate_err"] = float((g[:n] - gr).abs().max())
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
            if a.out:
                with open(a.out, "w") as f:
                    json.dump(res, f, indent=1)
        return 0
    res = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, T=T, rows=[])
    for item in a.configs.split(","):
        s, K = map(int, item.split(":"))
        px, py = inputs(T, s, seed=s + K)
        row = dict(s=s, K=K)
        t0 = time.time()
        if not a.no_old:
            row["old_ms"] = timeit(old_topk(px, py, K, "product"), a.iters)
            if a.probe:
                for st in (1, 2, 3):
                    row[f"old_stage{st}_ms"] = timeit(old_topk(px, py, K, "product", stage=st), a.iters)
        run = new_topk(px, py, K, "product")
        if not a.probe:
            row["new_ms"] = timeit(run, a.iters)
        if a.check:
            g, i = run()
            n = min(a.check, T)
            gr, ir = ops.product_key_topk_reference(px[:n], py[:n], K, "product")
            row["exact_tokens"] = f"{int((i[:n] == ir).all(1).sum())}/{n}"
            row["gates_maxdiff"] = float((g[:n] - gr).abs().max())
        row["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(row), flush=True)
        res["rows"].append(row)
    if a.probe:
        for block, rows, warps, dt in ((512, 1, 4, torch.int64), (2048, 1, 8, torch.int64), (4096, 1, 4, torch.int64),
                                       (4096, 1, 8, torch.int64), (4096, 1, 16, torch.int64), (4096, 1, 8, torch.int32),
                                       (4096, 64, 8, torch.int64), (4096, 8, 8, torch.int64)):
            x = torch.randint(-2**40, 2**40, (T, block), device="cuda").to(dt)
            ms = timeit(lambda: _sort_probe[(T,)](x, BLOCK=block, ROWS=rows, num_warps=warps), a.iters)
            row = dict(probe="sort", block=block, rows=rows, warps=warps, dtype=str(dt), ms=ms)
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
