#!/usr/bin/env python3
"""Phase split of the product-key router's large-K kernel (router.py) on a GPU: the whole kernel
sorted and unsorted (sort=False, what the layer's pair-list schedules run), the threshold kernel
(theta and e_star only: what the rule-driven dense schedule runs), then the threshold helper's
source cut after the two axis sorts and after the theta bisection (what a phase computed is
returned as theta, which the threshold kernel stores; the cut copies live in a temporary module,
the kernel itself is not copied). T tokens of bf16-rounded router logits (as the layer's bf16
router GEMM gives them: exact ties are common) or fp32 ones.

    python3 scripts/profile_router.py [--ks 512,2048,4096] [--tokens 4096] [--side 320] [--fp32-logits]
        [--warps 2,4]   (also time every kernel with these warp counts instead of router._large_num_warps)
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
from bench_common import event_times_ms  # noqa: E402

# Phase -> (the source line of _topk_threshold it ends with, the return that keeps its result alive).
CUTS = {
    "axis_sorts": ("_sort_axis(py_ptr + t * stride_py, s, yv_ptr, yi_ptr, KA, BLOCK_S)\n    tl.debug_barrier()",
                   "    return tl.load(xi_ptr + 1), tl.load(yi_ptr + 1), 0, 0, 0, 0"),
    "through_bisection": ("        c_hi = tl.where(ok, c_hi, cm)",
                          "    return (lo + tl.sum(c_lo, axis=0)).to(tl.int32), lo.to(tl.int32), 0, 0, 0, 0"),
}


def _cut_kernel(router_src: str, phase: str, tmp: Path):
    """The threshold kernel of a copy of router.py whose _topk_threshold returns after `phase`."""
    start = router_src.index("\ndef _topk_threshold(") + 1
    end = router_src.index("\n@triton.jit", start)
    line, keep = CUTS[phase]
    body = router_src[start:end]
    body = body[: body.index(line) + len(line)] + "\n" + keep + "\n"
    src = (router_src[:start] + body + router_src[end:]).replace(
        "from .. import ops", "from omnimoe import ops").replace("from ._launch", "from omnimoe.kernels._launch")
    path = tmp / f"router_cut_{phase}.py"  # triton.jit needs the function's source in a file
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._product_key_threshold_kernel


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="512,2048,4096")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--side", type=int, default=320)
    ap.add_argument("--fp32-logits", action="store_true")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warps", default="")
    args = ap.parse_args()
    import torch

    from omnimoe.kernels import router as kr

    try:
        warp_counts = [None] + [int(w) for w in args.warps.split(",") if w]
    except ValueError:
        print(f"--warps takes warp counts separated by commas, got {args.warps!r}", file=sys.stderr)
        return 2
    ks = [int(k) for k in args.ks.split(",")]
    if any(k <= kr.SMALL_K_MAX or k > min(4096, args.side**2) for k in ks):
        print(f"--ks must lie in ({kr.SMALL_K_MAX}, min(4096, side^2)]", file=sys.stderr)
        return 2
    T, s = args.tokens, args.side
    torch.manual_seed(0)
    logits = torch.randn(T, 2 * s, device="cuda")
    if not args.fp32_logits:
        logits = logits.bfloat16().float()
    px, py = torch.log_softmax(logits[:, :s], -1), torch.log_softmax(logits[:, s:], -1)
    router_src = Path(kr.__file__).read_text()
    with tempfile.TemporaryDirectory() as tmp:
        cuts = {phase: _cut_kernel(router_src, phase, Path(tmp)) for phase in CUTS}
        for K, warps in ((k, w) for k in ks for w in warp_counts):
            default = kr._large_num_warps
            if warps:
                kr._large_num_warps = lambda s, w=warps: w
            try:
                row = {}
                for sort in (True, False):
                    row["sorted" if sort else "unsorted"] = statistics.median(event_times_ms(
                        lambda: kr.product_key_topk_triton(px, py, K, "product", sort=sort), args.iters, 3))
                row["threshold"] = statistics.median(event_times_ms(
                    lambda: kr.product_key_threshold_triton(px, py, K), args.iters, 3))
                meta = kr.threshold_kernel_config(s, K)
                ka = min(K, s)
                ws = torch.empty(T * kr._WS_ROWS * ka, dtype=torch.int32, device="cuda")
                theta = torch.empty(T, dtype=torch.int32, device="cuda")
                e_star = torch.empty(T, dtype=torch.int32, device="cuda")
                for phase, kernel in cuts.items():
                    row[phase] = statistics.median(event_times_ms(
                        lambda: kernel[(T,)](px, py, theta, e_star, ws.view(torch.float32), ws, s, K, ka, s, s, **meta),
                        args.iters, 3))
            finally:
                kr._large_num_warps = default
            label = f"K={K}" + (f", {warps} warps" if warps else "")
            print(f"{label}: " + "  ".join(f"{k} {v:.3f} ms" for k, v in row.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
