#!/usr/bin/env python3
"""A/B of the grid-line schedule (grid_row.py) at SPEC §7 paper shapes on a GPU: the whole schedule
and its sort phase alone (sort_only), each replayed as a CUDA graph, for variants of the module:

  base[:KEY=V,...]   grid_row as committed, with GR_KEY constants changed (e.g. base:GATE_BLOCK=256;
                     base:BM=64,WARPS=4,STAGES=3 runs the panel kernel with other tiles)
  store_y            plain stores into y instead of fp32 atomics      } timing only: these cut or
  no_gzero           the gate tile is not zeroed per block             } replace one piece of the
  no_gbuild          no zeroing and no scatter of the gate tile        } panel kernel's work, so
  no_gemm2           the second product replaced by a row sum of H     } their output is wrong
  tables_in_l2       expert rows read modulo 8192 (16 MB of tables)    } (probes of what bounds
  x_rows_in_l2       token rows read modulo 256                        }  the panel kernel)
  gemm1_one_step     the first product over the first BD of d only     }
  gemm2_one_step     the second product for the first BD2 of d only    }
  gemms_one_step     both                                              }

  no_rule_scatter    (--rule) the rule slots' gates never stored into the gate tile

Variants are written as temporary copies of grid_row.py (triton.jit needs the source in a file);
the committed module is not touched. `--profile` adds the per-kernel CUDA time of `base`.
Routing: exact product-key top-K of random per-axis log-probs (bench_schedules' "product").
`--rule` times grid_row.rule_launch (the layer's schedule for product gates: slots and gates from
the router's rule, the router included) on log-softmaxed bf16-rounded random logits instead, e.g.
    python3 scripts/ab_grid_panel.py --rule --configs paper_min,paper_k2048 \
        --variants "base;base:RULE_BM=128,RULE_WARPS=8,RULE_STAGES=4,RULE_PROGRAMS=396;no_rule_scatter"

    python3 scripts/ab_grid_panel.py [--configs paper_min,paper_k4096] [--variants "base;base:GATE_BLOCK=256"] [--profile]

`--launches-only` runs each variant's schedule twice, untimed, for Nsight Compute, e.g.
    ncu --kernel-name regex:_gr_panel_kernel --launch-skip 1 --launch-count 1 --section SpeedOfLight \
        --section Occupancy --section SchedulerStats python3 scripts/ab_grid_panel.py --configs paper_min \
        --variants base --launches-only
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from bench_common import capture_graph, event_times_ms, expert_tables, product_routing  # noqa: E402

CONFIGS = {"paper_min": 512, "paper_k1024": 1024, "paper_k2048": 2048, "paper_k4096": 4096}  # K; T=4096, d=1024, N=320^2
_ATOMIC_Y = 'tl.atomic_add(y_ptr + xrow[:, None] + d0 + dd2[None, :], o, mask=rm[:, None] & dm[None, :], sem="relaxed")'
_ZERO_G = """        for c in tl.static_range(NCH):
            tl.store(g_base + mm[:, None] * GW + c * BC + bc[None, :], tl.zeros([BM, BC], dtype=tl.float32))
"""
_SCATTER_G = '            tl.atomic_add(g_base + sl * GW + col, gv, mask=qm, sem="relaxed")\n'
_GEMM2 = "            o = _gr_dot(h, _gr_table_tile(down_ptr, ebase, estride, width, c, d0, D, dd2, dm, BC), o, IEEE)"
_GEMM1_ONE_STEP = ("for d0 in range(0, D, BD):", "for d0 in range(0, BD, BD):")
_GEMM2_ONE_STEP = ("for d0 in range(0, D, BD2):", "for d0 in range(0, BD2, BD2):")
CUTS = {
    "base": [],
    "store_y": [(_ATOMIC_Y, "tl.store(y_ptr + xrow[:, None] + d0 + dd2[None, :], o, mask=rm[:, None] & dm[None, :])")],
    "no_gzero": [(_ZERO_G, "")],
    "no_gbuild": [(_ZERO_G, ""), (_SCATTER_G, "            pass\n")],
    "no_gemm2": [(_GEMM2, "            o += h.to(tl.float32).sum(axis=1)[:, None]")],
    "tables_in_l2": [("rows = (ebase + k * estride).to(tl.int64) * D", "rows = ((ebase + k * estride) % 8192).to(tl.int64) * D")],
    "gemm1_one_step": [_GEMM1_ONE_STEP],
    "gemm2_one_step": [_GEMM2_ONE_STEP],
    "gemms_one_step": [_GEMM1_ONE_STEP, _GEMM2_ONE_STEP],
    "x_rows_in_l2": [("        xrow = tok * D\n", "        xrow = (tok % 256) * D\n")],
    "no_rule_scatter": [("        tl.store(g_base + m * GW + idx, tl.exp(score), mask=win)\n", "")],
}


def _variant_module(name: str, params: str, tmp: Path):
    from omnimoe.kernels import grid_row

    src = Path(grid_row.__file__).read_text()
    src = src.replace("from .experts import", "from omnimoe.kernels.experts import")
    src = src.replace("from ._launch import", "from omnimoe.kernels._launch import")
    src = src.replace("from .router import", "from omnimoe.kernels.router import")
    for old, new in CUTS[name]:
        if old not in src:
            raise SystemExit(f"variant {name}: grid_row.py no longer contains the code it cuts")
        src = src.replace(old, new)
    path = tmp / f"grid_row_{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for item in filter(None, params.split(",")):
        key, value = item.split("=")
        if not hasattr(module, "GR_" + key.strip().upper()):
            raise SystemExit(f"grid_row has no constant GR_{key.strip().upper()}")
        setattr(module, "GR_" + key.strip().upper(), int(value))
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="paper_min,paper_k2048,paper_k4096")
    ap.add_argument("--variants", default="base;no_gbuild")
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--launches-only", action="store_true", help="two untimed launches per variant (for ncu)")
    ap.add_argument("--rule", action="store_true", help="time rule_launch (router included) instead of launch")
    args = ap.parse_args()
    variants = [v.partition(":")[::2] for v in args.variants.split(";") if v]
    bad = [c for c in args.configs.split(",") if c not in CONFIGS] + [n for n, _ in variants if n not in CUTS]
    if bad:
        print(f"unknown config or variant: {', '.join(bad)}", file=sys.stderr)
        return 2
    import torch

    T, d, s = 4096, 1024, 320
    N, dev = s * s, torch.device("cuda")
    med = lambda fn: statistics.median(event_times_ms(fn, args.iters, 3))  # noqa: E731
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs.split(","):
            K = CONFIGS[name]
            torch.manual_seed(0)
            x = torch.randn(T, d, device=dev, dtype=torch.bfloat16)
            up, down = expert_tables(N, d, dev)
            gates, idx = product_routing(T, s, K, dev)
            out = torch.empty(T, d, device=dev, dtype=torch.bfloat16)
            for vname, params in variants:
                m = _variant_module(vname, params, Path(tmp))
                tag = vname + (":" + params if params else "")
                if args.rule:
                    torch.manual_seed(1)
                    lp = torch.log_softmax(torch.randn(T, 2, s, device=dev).bfloat16().float(), -1).view(T, 2 * s)
                    ws = torch.empty(m.rule_workspace_bytes(T, K, N, d), device=dev, dtype=torch.uint8)
                    full, _ = capture_graph(lambda: m.rule_launch(x, up, down, lp, K, 0, out, ws))
                    print(f"{name} {tag}: rule schedule (router included) {med(full.replay):.3f} ms", flush=True)
                    continue
                ws = torch.empty(m.workspace_bytes(T, K, N, d), device=dev, dtype=torch.uint8)
                if args.launches_only:
                    for _ in range(2):
                        m.launch(x, up, down, gates, idx, out, ws, 0)
                    torch.cuda.synchronize()
                    continue
                full, _ = capture_graph(lambda: m.launch(x, up, down, gates, idx, out, ws, 0))
                sort, _ = capture_graph(lambda: m.launch(x, up, down, gates, idx, out, ws, 0, sort_only=True))
                sort_ms, full_ms = med(sort.replay), med(full.replay)
                print(f"{name} {tag}: schedule {full_ms:.3f} ms, sort {sort_ms:.3f}, panel + cast {full_ms - sort_ms:.3f}",
                      flush=True)
            if args.profile:
                from torch.profiler import ProfilerActivity, profile

                m = _variant_module("base", "", Path(tmp))
                ws = torch.empty(m.workspace_bytes(T, K, N, d), device=dev, dtype=torch.uint8)
                m.launch(x, up, down, gates, idx, out, ws, 0)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        m.launch(x, up, down, gates, idx, out, ws, 0)
                    torch.cuda.synchronize()
                for ev in prof.key_averages():
                    if ev.device_time_total > 0:
                        print(f"  {name} {ev.key[:40]:40s} {ev.device_time_total / 5 / 1000:.3f} ms per call", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
