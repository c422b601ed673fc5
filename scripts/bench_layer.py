#!/usr/bin/env python3
"""Benchmark the OmniMoE layer forward on a GPU at every SPEC §7 config (bf16, inference).

One subprocess per config (fresh CUDA context and a fresh Triton cache, so "first call" is the
real compile cost). Columns: dense shared MLP alone, PEER-style token-centric baseline, the
reference path, the Triton path (eager: as a caller sees it, which replays the layer's own CUDA
graphs for decode and repeated token counts; "launches": every kernel launched from Python; and
one CUDA graph of the whole forward), roofline = max(bytes / 4.8 TB/s,
FLOPs / 790 TFLOP/s). Timings are medians of per-iteration CUDA-event times after warm-up.
Accuracy per row: rel_err_bf16_vs_fp32 (our bf16 output against the layer in float32 on the same
weights with our routing, all T tokens) and peer_rel_err_bf16_vs_fp32 (the PEER-style bf16 path
against float32 with its own routing); rel_err_bf16 is against the bf16 reference backend.
ONNX Runtime row (ORT_CONFIGS; needs onnxruntime-gpu): the layer's standard-op twin exported in
bf16 (one export per weight shape, reused across token counts) on the CUDA execution provider,
inputs and outputs bound to GPU memory (I/O binding), host wall time per run (ORT's run returns
when the GPU is done); its error is against our bf16 output. host_launch_us per row: the host's
time to queue one small kernel, to tell a slow host from a slow layer in the eager column.
Writes <out>/h200.json, <out>/h200.png and <out>/README-table.md and prints the table.

    python3 scripts/bench_layer.py --out benchmarks [--configs readme,n65k] [--iters 25]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_common import bench_layer, capture_graph, event_times_ms, host_us  # noqa: E402

# name: (d, I, N, K, T)   -- SPEC §7
CONFIGS = {
    "readme": (1024, 4096, 4096, 16, 4096),
    "n65k": (1024, 4096, 65536, 16, 4096),
    "n1m": (1024, 4096, 1048576, 16, 4096),
    "paper_min": (1024, 1024, 102400, 512, 4096),
    "paper_k2048": (1024, 1024, 102400, 2048, 4096),
    "paper_k4096": (1024, 1024, 102400, 4096, 4096),
    "decode_t1": (1024, 4096, 1048576, 16, 1),
    "decode_t8": (1024, 4096, 1048576, 16, 8),
    "decode_t64": (1024, 4096, 1048576, 16, 64),
}
# Configs that also get the ONNX Runtime CUDA-provider row (issue 13).
ORT_CONFIGS = ("readme", "n1m", "decode_t1", "decode_t8", "decode_t64")
# Issue 11 targets: CUDA-graph ms, eager ms, and speed-up over the PEER-style layer (same run).
TARGETS_MS = {"readme": 0.25, "n65k": 0.28, "n1m": 0.32, "paper_min": 1.1, "paper_k2048": 2.5, "paper_k4096": 3.0,
              "decode_t1": 0.035, "decode_t64": 0.045}
TARGETS_EAGER_MS = {"readme": 0.35, "decode_t1": 0.20}
TARGETS_VS_PEER = {"readme": 3.0, "n65k": 3.0, "n1m": 3.0, "paper_min": 10.9, "paper_k2048": 10.9, "paper_k4096": 10.9}
# Issue 11: first call in a new process, kernels compiled once before (on-disk cache), seconds.
FIRST_CALL_TARGET_S = 10.0
# Score gap (log-prob units, fp32 log-probs) under which a different routing choice is a near-tie.
ROUTING_TIE_TOL = 1e-4
HBM_BPS = 4.8e12
TC_FLOPS = 790e12
# Slow baselines get fewer iterations: about this many seconds each, but at least MIN_SLOW_ITERS.
SLOW_BUDGET_S = 2.0
MIN_SLOW_ITERS = 5


def roofline_ms(d, inter, n, k, t, elt=2):
    s = math.isqrt(n)
    touched = n * (1.0 - (1.0 - k / n) ** t)  # expected distinct experts under uniform routing
    nbytes = elt * (3 * d * inter + 2 * s * d + 2 * touched * d + 2 * t * d) + t * k * 8
    flops = 2 * t * d * (3 * inter + 2 * s) + 4 * t * k * d
    return 1e3 * max(nbytes / HBM_BPS, flops / TC_FLOPS), nbytes, flops


def _time(fn, iters, warmup=3, adaptive=False):
    import torch

    if adaptive:
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        one = time.perf_counter() - t0
        iters = max(MIN_SLOW_ITERS, min(iters, int(SLOW_BUDGET_S / max(one, 1e-9))))
        warmup = 0
    ts = event_times_ms(fn, iters, warmup)
    return {"median_ms": statistics.median(ts), "min_ms": min(ts), "iters": iters}


def _busy(fn, seconds: float = 0.5) -> None:
    """Run fn back to back for a while first: an idle GPU's clocks ramp up under load, and the
    first timed config of a run would otherwise pay for it (steady-state numbers; the first call
    is measured on its own)."""
    import torch

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        torch.cuda.synchronize()


def host_launch_us(launches: int = 400) -> float:
    """Host time per launch of a one-element CUDA kernel, queued without waiting: the machine's
    host speed, recorded per row, because eager times at large T are bound by host launch time
    once the GPU work is short (compare runs on it before comparing their eager columns)."""
    import torch

    one = torch.zeros(1, device="cuda")
    return host_us(lambda: one.add_(1), launches)


def _guard(fn):
    import torch

    try:
        return fn()
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return {"skipped": f"out of memory: {str(e).splitlines()[0]}"}


def fp32_forward(layer, x, gates, indices):
    """The layer in float32 on the same (bf16-valued) weights and the given routing: the yardstick
    for rel_err_bf16_vs_fp32 (ours) and peer_rel_err_bf16_vs_fp32 (PEER-style, its own routing)."""
    import torch
    import torch.nn.functional as F

    from omnimoe import ops

    cfg = layer.config
    x32 = x.float()
    # Gathered rows are upcast inside the reference op: exact fp32 copies of the bf16 tables.
    y = ops.expert_grouped_matmul_reference(x32, layer.up_embed.weight, layer.down_embed.weight, gates,
                                            indices.to(torch.int32), cfg.hidden_act)
    if cfg.intermediate_size > 0:
        act = ops.activation(cfg.hidden_act)
        h = act(F.linear(x32, layer.gate_proj.weight.float())) * F.linear(x32, layer.up_proj.weight.float())
        y = y + F.linear(h, layer.down_proj.weight.float())
    return y


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def worker(name: str, iters: int, first_call_only: bool = False) -> dict:
    import torch

    from omnimoe import ops
    from omnimoe.baselines import dense_mlp_forward, peer_forward
    from omnimoe.kernels import expert_grouped_matmul_triton, use_expert_centric
    from omnimoe.kernels import grid_row
    from omnimoe.kernels.experts import EXPERT_CENTRIC_SCHEDULE, expert_dense_matmul, use_dense, use_grid_row

    d, inter, n, k, t = CONFIGS[name]
    torch.manual_seed(0)
    # The fp32 yardstick must be fp32 (no TF32 in its GEMMs).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    layer, x = bench_layer(d, inter, n, k, t)
    # The schedule the layer's inference path runs (OmniMoELayer._forward_launch).
    if use_dense(t, k, n):
        from omnimoe.kernels.dense_rule import rule_applies

        schedule = "dense_rule" if rule_applies(k, layer.config.gate) else "dense"
    elif use_expert_centric(t, k, n):
        schedule = "grid" if use_grid_row(t, k, n) else EXPERT_CENTRIC_SCHEDULE
    else:
        schedule = "token"
    # Schedules timed and checked one by one (the grid rows need a square N and enough tokens).
    schedules = ("token", "expert", "hybrid") + (("grid",) if t >= 256 and grid_row.supported(t, k, n) else ())
    res = {"name": name, "d": d, "I": inter, "N": n, "K": k, "T": t, "schedule": schedule,
           "measured_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    with torch.inference_mode():
        t0 = time.perf_counter()
        y_tri = layer(x)
        torch.cuda.synchronize()
        res["first_call_s"] = time.perf_counter() - t0
        if first_call_only:
            return res
        _busy(lambda: layer(x))
        res["triton"] = _time(lambda: layer(x), iters)
        # The same calls with every kernel launched from Python (no graph replays at any T).
        layer.decode_cuda_graphs = layer.repeat_cuda_graphs = False
        res["triton_launch"] = _time(lambda: layer(x), iters)
        layer.decode_cuda_graphs = layer.repeat_cuda_graphs = True
        res["host_launch_us"] = host_launch_us()

        # CUDA graph of the whole layer forward.
        graph, y_graph = capture_graph(lambda: layer(x))
        graph.replay()
        torch.cuda.synchronize()
        res["graph_matches_eager"] = bool(torch.equal(y_graph, y_tri)) or float((y_graph.float() - y_tri.float()).norm() / y_tri.float().norm()) < 1e-3
        res["triton_graph"] = _time(graph.replay, iters)
        del graph

        res["dense"] = _time(lambda: dense_mlp_forward(layer, x), iters)
        res["peer"] = _guard(lambda: _time(lambda: peer_forward(layer, x), iters, warmup=1, adaptive=True))

        # Accuracy against float32 on the same weights, each path with its own routing (all tokens).
        from omnimoe.baselines import peer_route

        g_own, i_own = layer.route(x)
        res["rel_err_bf16_vs_fp32"] = _guard(lambda: _rel(y_tri, fp32_forward(layer, x, g_own, i_own)))
        y_peer = _guard(lambda: peer_forward(layer, x))
        if not isinstance(y_peer, dict):
            g_p, i_p = peer_route(layer, x)
            res["peer_rel_err_bf16_vs_fp32"] = _guard(lambda: _rel(y_peer, fp32_forward(layer, x, g_p, i_p)))
            res["peer_routing_same_pct"] = 100.0 * float(
                (i_p.long().sort(1).values == i_own.long().sort(1).values).all(1).float().mean())
        del y_peer

        # Routing agreement and errors against the reference path.
        # Both backends route on the same log-probs and both top-Ks are exact, so any difference
        # must be a near-tie; exact agreement, near-ties and real mismatches are reported apart.
        g_tri, i_tri = layer.route(x)
        layer.backend = "reference"
        px_ref, py_ref = layer.router_log_probs(x)
        g_ref, i_ref = layer.route(x)
        differs, near = ops.routing_near_ties(px_ref, py_ref, i_ref, i_tri, ROUTING_TIE_TOL)
        agree = ~differs
        res["agree_pct"] = 100.0 * float(agree.float().mean())
        res["near_tie_pct"] = 100.0 * float(near.float().mean())
        res["routing_mismatches"] = int((differs & ~near).sum())
        res["routing_tie_tol"] = ROUTING_TIE_TOL
        y_ref = _guard(lambda: layer(x))
        if isinstance(y_ref, dict):
            res["reference"] = y_ref
        else:
            a = agree
            res["rel_err_bf16"] = float((y_tri[a].float() - y_ref[a].float()).norm() / y_ref[a].float().norm())
            res["reference"] = _guard(lambda: _time(lambda: layer(x), iters, warmup=1, adaptive=True))
        layer.backend = "triton"

        # fp32 expert op (same routing) on up to 256 tokens: the kernel's math at full precision.
        sub = slice(0, min(t, 256))
        up32, down32 = layer.up_embed.weight.float(), layer.down_embed.weight.float()
        x32 = x[sub].float().contiguous()
        gs, is_ = g_tri[sub].contiguous(), i_tri[sub].contiguous()
        y32_ref = ops.expert_grouped_matmul_reference(x32, up32, down32, gs, is_, "silu")
        for sched in schedules:
            y32 = expert_grouped_matmul_triton(x32, up32, down32, gs, is_, "silu", schedule=sched)
            res[f"rel_err_fp32_{sched}"] = float((y32 - y32_ref).norm() / y32_ref.norm())
        y32 = _guard(lambda: expert_dense_matmul(x32, up32, down32, gs, is_, "silu"))
        if not isinstance(y32, dict):
            res["rel_err_fp32_dense"] = float((y32 - y32_ref).norm() / y32_ref.norm())
        del up32, down32

        # Expert op alone under each schedule (bf16), to justify the auto choice.
        up, down = layer.up_embed.weight, layer.down_embed.weight
        res["experts_only"] = {
            sched: _time(lambda: expert_grouped_matmul_triton(x, up, down, g_tri, i_tri, "silu", schedule=sched), iters)
            for sched in schedules
        }
        res["experts_only"]["dense"] = _guard(lambda: _time(
            lambda: expert_dense_matmul(x, up, down, g_tri, i_tri, "silu"), iters, warmup=1, adaptive=True))
        from omnimoe.kernels import product_key_topk_triton

        px = torch.log_softmax(layer.router_gate_x(x).float(), -1)
        py = torch.log_softmax(layer.router_gate_y(x).float(), -1)
        res["router_only"] = _time(lambda: product_key_topk_triton(px, py, k, "product"), iters)
        # What the layer runs: the same top-K without ordering the K winners (sort=False).
        res["router_only_unsorted"] = _time(lambda: product_key_topk_triton(px, py, k, "product", sort=False), iters)

    rl, nbytes, flops = roofline_ms(d, inter, n, k, t)
    res.update(roofline_ms=rl, roofline_bytes=nbytes, roofline_flops=flops)
    return res


def ort_worker(name: str, iters: int, cache_dir: str) -> dict:
    """The standard-op twin of the config's layer on ONNX Runtime's CUDA provider: bf16, or fp16
    where this onnxruntime lacks a bf16 CUDA kernel for one of the twin's ops (said in the row)."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    from export.onnx_export import export_onnx
    from export.ort import ort_session

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": f"onnxruntime {ort.__version__} has no CUDA execution provider"}
    d, inter, n, k, t = CONFIGS[name]
    torch.manual_seed(0)
    layer, x = bench_layer(d, inter, n, k, t)  # same seed: the same weights and x as the main row
    with torch.inference_mode():
        y_ours = layer(x)
    layer.backend = "reference"
    layer.cpu()
    torch.cuda.empty_cache()
    res = {"onnxruntime": ort.__version__}
    for dtype, proto, torch_dtype in (("bf16", TensorProto.BFLOAT16, torch.bfloat16),
                                      ("fp16", TensorProto.FLOAT16, torch.float16)):
        # Weights depend on the shape only: the decode configs reuse n1m's export.
        path = Path(cache_dir) / f"layer_d{d}_i{inter}_n{n}_k{k}_{dtype}.onnx"
        if not path.is_file():
            t0 = time.perf_counter()
            export_onnx(layer, path, example_inputs=(torch.zeros(2, 3, d),), ops="standard", dtype=dtype,
                        input_names=["x"], output_names=["y"], dynamic_shapes=({0: "batch", 1: "seq"},),
                        progress=False)
            res[f"export_{dtype}_s"] = time.perf_counter() - t0
        try:
            t0 = time.perf_counter()
            sess = ort_session(path, providers=["CUDAExecutionProvider"])
            res["session_s"] = time.perf_counter() - t0
            xb = x.reshape(1, t, d).to(torch_dtype).contiguous()
            yb = torch.empty_like(xb)
            binding = sess.io_binding()
            binding.bind_input("x", "cuda", 0, proto, list(xb.shape), xb.data_ptr())
            binding.bind_output("y", "cuda", 0, proto, list(yb.shape), yb.data_ptr())
            sess.run_with_iobinding(binding)
        except Exception as e:  # noqa: BLE001 -- a missing kernel for this dtype: say so, try the next
            res[f"{dtype}_failed"] = str(e).strip().splitlines()[0][:300]
            continue
        res["dtype"] = dtype
        res["providers"] = sess.get_providers()
        for _ in range(3):
            sess.run_with_iobinding(binding)
        times = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            sess.run_with_iobinding(binding)
            torch.cuda.synchronize()
            times.append(1e3 * (time.perf_counter() - t0))
        res.update(median_ms=statistics.median(times), min_ms=min(times), iters=iters)
        res["rel_err_vs_ours"] = _rel(yb.reshape(t, d), y_ours)
        return res
    res["skipped"] = "no dtype ran on the CUDA provider"
    return res


def _fmt(r, key):
    v = r.get(key)
    if not isinstance(v, dict):
        return "n/a"
    if "skipped" in v:
        return "skipped"
    return f"{v['median_ms']:.3f}"


def _misses(r) -> list[str]:
    """Issue 11 targets this row misses (graph ms, eager ms, x over PEER, error vs PEER's)."""
    name, out = r["name"], []
    graph, eager = r["triton_graph"]["median_ms"], r["triton"]["median_ms"]
    peer = r["peer"].get("median_ms") if isinstance(r.get("peer"), dict) else None
    if name in TARGETS_MS and graph > TARGETS_MS[name]:
        out.append("graph")
    if name in TARGETS_EAGER_MS and eager > TARGETS_EAGER_MS[name]:
        out.append("eager")
    if name in TARGETS_VS_PEER and (peer is None or peer / graph < TARGETS_VS_PEER[name]):
        out.append("vs PEER")
    if r.get("first_call_s", 0.0) > FIRST_CALL_TARGET_S:
        out.append("first call")
    ours, theirs = r.get("rel_err_bf16_vs_fp32"), r.get("peer_rel_err_bf16_vs_fp32")
    if isinstance(ours, float) and isinstance(theirs, float) and ours > theirs:
        out.append("error")
    return out


def _err(v) -> str:
    return f"{v:.1e}" if isinstance(v, float) else "n/a"


def table(results: list[dict]) -> str:
    head = ("| config | T | N | K | dense MLP ms | PEER ms | reference ms | Triton ms | Triton launches ms | Triton graph ms | roofline ms "
            "| ORT CUDA ms | vs PEER (graph) | vs roofline | target graph / eager ms | met | first call s: cached / cold "
            "| routing: same / near-tie / mismatch | rel err bf16 vs fp32: ours / PEER | rel err vs reference | rel err fp32 |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | error: {r['error'][:80]} |" + " |" * 16)
            continue
        best = r["triton_graph"]["median_ms"]
        peer = r["peer"].get("median_ms") if isinstance(r.get("peer"), dict) else None
        name = r["name"]
        tgt = f"{TARGETS_MS.get(name, '-')} / {TARGETS_EAGER_MS.get(name, '-')}"
        misses = _misses(r)
        met = "-" if name not in TARGETS_MS and name not in TARGETS_EAGER_MS else ("yes" if not misses else "no: " + ", ".join(misses))
        fp32 = max(r.get(f"rel_err_fp32_{k}", float("nan")) for k in ("token", "expert", "hybrid", "grid", "dense"))
        ort_mark = " (earlier run)" if r.get("ort_cuda_from_earlier_run") else ""
        lines.append(
            f"| {name} | {r['T']} | {r['N']} | {r['K']} | {_fmt(r, 'dense')} | {_fmt(r, 'peer')} | {_fmt(r, 'reference')} "
            f"| {_fmt(r, 'triton')} | {_fmt(r, 'triton_launch')} | {_fmt(r, 'triton_graph')} | {r['roofline_ms']:.3f} | {_fmt(r, 'ort_cuda')}{ort_mark} "
            f"| {'%.1fx' % (peer / best) if peer else 'n/a'} | {r['roofline_ms'] / best:.2f} "
            f"| {tgt} | {met} | {r['first_call_s']:.1f} / {r.get('first_call_cold_s', float('nan')):.1f} "
            f"| {r['agree_pct']:.2f}% / {r.get('near_tie_pct', 0.0):.2f}% / {r.get('routing_mismatches', 'n/a')} "
            f"| {_err(r.get('rel_err_bf16_vs_fp32'))} / {_err(r.get('peer_rel_err_bf16_vs_fp32'))} "
            f"| {_err(r.get('rel_err_bf16'))} | {fp32:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if "error" not in r]
    cols = [("dense", "dense MLP"), ("peer", "PEER (torch)"), ("reference", "reference"), ("triton", "Triton"),
            ("triton_graph", "Triton + CUDA graph")]
    fig, ax = plt.subplots(figsize=(12, 5))
    w = 0.14
    for j, (key, label) in enumerate(cols):
        vals = [r[key]["median_ms"] if isinstance(r.get(key), dict) and "median_ms" in r[key] else 0 for r in ok]
        ax.bar([i + (j - 2.5) * w for i in range(len(ok))], vals, w, label=label)
    ax.scatter([i + 3 * w for i in range(len(ok))], [r["roofline_ms"] for r in ok], marker="_", s=300, c="k", label="roofline")
    ax.set_xticks(range(len(ok)), [f"{r['name']}\nN={r['N']} K={r['K']} T={r['T']}" for r in ok], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("layer forward, ms (median, log)")
    ax.set_title("OmniMoE layer forward, bf16")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--iters", type=int, default=25)
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other configs already in <out>/h200.json (a run split over several calls)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--ort-worker", help=argparse.SUPPRESS)
    ap.add_argument("--ort-cache", help=argparse.SUPPRESS)
    ap.add_argument("--no-ort", action="store_true", help="skip the ONNX Runtime CUDA-provider rows")
    ap.add_argument("--ort-only", action="store_true",
                    help="with --append: measure only the ONNX Runtime rows, into the configs' existing rows")
    ap.add_argument("--first-call-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=240.0, help="seconds per config subprocess")
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.iters, args.first_call_only)), flush=True)
        return 0
    if args.ort_worker:
        print("RESULT " + json.dumps(ort_worker(args.ort_worker, args.iters, args.ort_cache)), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.configs.split(",")
    kept, commands, previous_rows = [], [], {}
    if args.append and (out / "h200.json").is_file():
        previous = json.loads((out / "h200.json").read_text())
        kept = [r for r in previous["results"] if r["name"] not in names]
        previous_rows = {r["name"]: r for r in previous["results"]}
        commands = previous["meta"].get("commands", [previous["meta"].get("command")])
    if args.ort_only and (args.no_ort or not all(n in previous_rows for n in names)):
        ap.error("--ort-only needs --append and rows for every config in <out>/h200.json (and no --no-ort)")
    results = []
    ort_cache = tempfile.mkdtemp(prefix="ort-models-")
    for name in names:
        # Fresh Triton cache per config: the first process pays the compile (first_call_cold_s),
        # the second reuses it from disk as any later process would (first_call_s).
        env = dict(os.environ, TRITON_CACHE_DIR=tempfile.mkdtemp(prefix=f"triton-{name}-"))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--iters", str(args.iters)]
        t0 = time.time()
        if args.ort_only:
            r = previous_rows[name]
        else:
            try:
                cold = _run_worker(cmd + ["--first-call-only"], env, args.timeout)
                r = _run_worker(cmd, env, args.timeout) if "error" not in cold else cold
                if "error" not in r:
                    r["first_call_cold_s"] = cold["first_call_s"]
            except subprocess.TimeoutExpired:
                r = {"name": name, "error": f"timed out after {args.timeout}s"}
        prev = previous_rows.get(name, {})
        if args.no_ort and not args.ort_only and "ort_cuda" in prev and "error" not in r:
            # --append --no-ort re-measures our rows only: the ONNX Runtime row of an earlier run
            # (ORT needs its CUDA wheel on the machine; it runs the standard-op twin, none of our
            # kernels) is kept and marked as such.
            r["ort_cuda"] = prev["ort_cuda"]
            r["ort_cuda_from_earlier_run"] = True
        if name in ORT_CONFIGS and not args.no_ort and "error" not in r:
            ort_cmd = [sys.executable, str(Path(__file__).resolve()), "--ort-worker", name, "--iters", str(args.iters),
                       "--ort-cache", ort_cache]
            try:
                o = _run_worker(ort_cmd, env, args.timeout)
            except subprocess.TimeoutExpired:
                o = {"error": f"timed out after {args.timeout}s"}
            r["ort_cuda"] = {"skipped": o["error"]} if "error" in o else o
        r["ort_wall_s" if args.ort_only else "wall_s"] = time.time() - t0
        print(json.dumps(r), flush=True)
        results.append(r)
        _write(out, _ordered(kept + results), args, commands)  # after every config: a killed run keeps its rows
    print(table(_ordered(kept + results)))
    return 0


def _ordered(results: list[dict]) -> list[dict]:
    order = list(CONFIGS)
    return sorted(results, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))


def _run_worker(cmd, env, timeout) -> dict:
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    if p.returncode or not line:
        sys.stderr.write(p.stderr[-3000:])
        flag = "--worker" if "--worker" in cmd else "--ort-worker"
        return {"name": cmd[cmd.index(flag) + 1], "error": (p.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[-1][7:])


def _write(out: Path, results: list[dict], args, commands=()) -> None:
    import torch
    import triton

    meta = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commands": [*commands, " ".join([Path(sys.executable).name] + sys.argv)],
        "dtype": "bfloat16", "iters": args.iters, "roofline": {"hbm_bytes_per_s": HBM_BPS, "tensor_flops": TC_FLOPS},
        "targets_ms": TARGETS_MS, "targets_eager_ms": TARGETS_EAGER_MS, "targets_vs_peer": TARGETS_VS_PEER,
    }
    (out / "h200.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    md = table(results)
    (out / "README-table.md").write_text(md)
    try:
        plot(results, out / "h200.png")
    except ImportError as e:
        print(f"no plot: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
