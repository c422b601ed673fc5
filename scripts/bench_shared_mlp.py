"""Shared-MLP hidden h = act(x Wg^T) * (x Wu^T): cuBLAS GEMMs + the gated-act kernel against the
fused Triton gate/up GEMM (swiglu._gated_mlp_kernel) per tile config, CUDA graphs.

    python3 scripts/bench_shared_mlp.py --tokens 4096,64,1 --d 1024 --inter 4096,1024
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (BM, BN, BK, GROUP_M, num_warps, num_stages) of the fused kernel
CONFIGS = [
    (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (128, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 3), (64, 128, 64, 8, 4, 5), (64, 128, 64, 4, 4, 4), (64, 128, 64, 16, 4, 4),
    (64, 128, 128, 8, 4, 3), (64, 64, 64, 8, 4, 4), (64, 64, 128, 8, 4, 3), (128, 128, 128, 8, 8, 2),
    (64, 256, 64, 8, 8, 3), (128, 64, 64, 8, 8, 4), (16, 64, 128, 1, 4, 4), (16, 32, 128, 1, 4, 4),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="4096,64,1")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--inter", default="4096,1024")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    a = ap.parse_args()

    import torch
    import torch.nn.functional as F
    import triton
    from triton.tools.tensor_descriptor import TensorDescriptor

    from omnimoe.kernels import swiglu
    from scripts.bench_common import capture_graph, event_times_ms, expert_tables

    torch.manual_seed(0)
    rows = []
    for inter in (int(v) for v in a.inter.split(",")):
        wg, wu = expert_tables(inter, a.d, "cuda")  # same draws: [I, d] bf16 of scale d^-0.5
        for t in (int(v) for v in a.tokens.split(",")):
            x = torch.randn(t, a.d, device="cuda").to(torch.bfloat16)
            ref = F.silu(x.float() @ wg.float().t()) * (x.float() @ wu.float().t())

            def timed(fn):
                graph, out = capture_graph(fn)
                ms = sorted(event_times_ms(graph.replay, a.iters, 5))[a.iters // 2]
                return ms, float((out.float() - ref).norm() / ref.norm())

            base_ms, base_err = timed(lambda: swiglu.gated_act_fast(F.linear(x, wg), F.linear(x, wu), 0))
            layer_ms, layer_err = timed(lambda: swiglu.gated_mlp_fast(x, wg, wu, 0, swiglu.gated_mlp_config(1024)))
            row = {"T": t, "d": a.d, "I": inter, "cublas_plus_gated_act_ms": base_ms, "cublas_err": base_err,
                   "gated_mlp_fast_ms": layer_ms, "gated_mlp_fast_err": layer_err, "fused": []}
            for bm, bn, bk, gm, nw, ns in CONFIGS:
                h = torch.empty(t, inter, device="cuda", dtype=torch.bfloat16)
                grid = (triton.cdiv(t, bm) * triton.cdiv(inter, bn),)
                meta = dict(ACT=0, BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=nw, num_stages=ns)
                descs = (TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(wg, [bn, bk]),
                         TensorDescriptor.from_tensor(wu, [bn, bk]), TensorDescriptor.from_tensor(h, [bm, bn]))

                def fn(h=h, grid=grid, meta=meta, descs=descs):
                    swiglu._gated_mlp_kernel[grid](*descs, torch.zeros(1, dtype=torch.int32, device="cuda"),
                                                   t, inter, a.d, **meta)
                    return h
                try:
                    ms, err = timed(fn)
                    row["fused"].append({"config": [bm, bn, bk, gm, nw, ns], "ms": ms, "err": err})
                except Exception as e:  # a config that does not compile (shared memory) is reported
                    row["fused"].append({"config": [bm, bn, bk, gm, nw, ns], "failed": str(e).splitlines()[0][:120]})
            best = min((f for f in row["fused"] if "ms" in f), key=lambda f: f["ms"])
            print(f"T={t} I={inter}: cuBLAS+act {base_ms*1e3:.1f} us err {base_err:.2e} | best fused {best['config']} "
                  f"{best['ms']*1e3:.1f} us err {best['err']:.2e} | gated_mlp_fast {layer_ms*1e3:.1f} us")
            for f in row["fused"]:
                print("   ", f["config"], f"{f['ms']*1e3:.1f} us" if "ms" in f else f["failed"])
            rows.append(row)
    if a.out:
        Path(a.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "triton": triton.__version__, "command": " ".join(sys.argv),
                                           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                                           "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
