"""Dense schedule of the routed experts driven by the router's rule instead of its pair list.

At high routing density (K/N >= experts.DENSE_MIN_DENSITY) the layer computes the routed experts
as two GEMMs over every (token, expert): Y = H Down, H = act(X Up^T) o G. `experts._dense_launch`
builds H from the router's K (gate, expert) pairs per token: it zeroes a [T, N] buffer, then
gathers S and scatters H at each pair (H200, paper_k4096: 0.25 + 0.43 ms of its 3.2 ms, and the
router's pair list another 0.13 ms).

Here the router emits each token's top-K as a rule (router.product_key_threshold_triton: theta
and e_star, no list), and one streaming pass turns S = X Up^T (cuBLAS, rounded to x's dtype as
before) into H in place: expert e = i*s + j is a winner iff key(px[i] + py[j]) > theta, or
== theta and e < e_star, with gate exp(px[i]) * exp(py[j]) (the router's exp(px[i] + py[j])
within 2 fp32 ulp); H = act(S) * gate for winners, else 0, rounded once.

The pass walks (grid rows, column block) tiles, so no index needs a division, and reads S whole
under its bounds only: a load masked per winner compiles to one 2-byte load per element, a
bounds-masked one to 16-byte vectors (sm_90 PTX; the winner-masked versions of this pass took
0.76-1.59 ms at paper_k4096). The gates' exponentials are one per grid row and column, not one
per element: the special-function units (16 per SM per clock) would otherwise bound the pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._launch import interpreting
from .experts import _act, dense_two_gemms
from .router import SMALL_K_MAX, _f32_key

# Tile of the rule pass (H200, paper_k4096, scripts/sweep_dense_rule.py: 32 x 64 x 4 warps 0.485 ms,
# 0.525 with a token's column blocks far apart in the grid, 0.54 with 16 rows or 8 warps; a copy of S
# 0.394): RULE_ROWS grid rows x RULE_COLS columns per step (a program owns one
# column block of one token and walks its rows), and its warps.
RULE_ROWS = 32
RULE_COLS = 64
RULE_WARPS = 4
RULE_PREFETCH = True
RULE_BLOCKS_FIRST = True


def rule_pass_config(rows: int = RULE_ROWS, cols: int = RULE_COLS, warps: int = RULE_WARPS,
                     prefetch: bool = RULE_PREFETCH, fast: bool | None = None,
                     blocks_first: bool = RULE_BLOCKS_FIRST) -> dict:
    """Constexprs + num_warps of `_dense_rule_kernel` (grid: rule_pass_grid); `fast` defaults to
    on except in the interpreter (inline PTX)."""
    fast = not interpreting() if fast is None else fast
    return dict(ROWS=rows, COLS=cols, FAST=bool(fast), PREFETCH=bool(prefetch), BLOCKS_FIRST=bool(blocks_first),
                num_warps=warps)


def rule_pass_grid(tokens: int, s: int, meta: dict) -> tuple[int, int]:
    blocks = triton.cdiv(s, meta["COLS"])
    return (blocks, tokens) if meta["BLOCKS_FIRST"] else (tokens, blocks)


@triton.jit
def _dense_rule_kernel(h_ptr, lp_ptr, theta_ptr, estar_ptr, s, stride_lp,
                       ACT: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, FAST: tl.constexpr,
                       PREFETCH: tl.constexpr, BLOCKS_FIRST: tl.constexpr):
    """In place over h [T, s*s] (= S on entry), column block c of token t, all grid rows:
    h[t, i*s + j] = act(S[t, i*s + j]) * exp(px[t, i]) * exp(py[t, j]) for the winners of token
    t's rule, else 0. lp [T, >= 2s] fp32 rows: px then py. FAST: _act's bare special-function ops
    (GPU only). PREFETCH: the next row block's S is loaded before this one's math (two loads in
    flight per thread)."""
    # BLOCKS_FIRST: grid (column blocks, T), a token's programs run side by side (DRAM locality).
    t = tl.program_id(1 if BLOCKS_FIRST else 0).to(tl.int64)
    j = tl.program_id(0 if BLOCKS_FIRST else 1) * COLS + tl.arange(0, COLS)
    jm = j < s
    lp_row = lp_ptr + t * stride_lp
    py = tl.load(lp_row + s + j, mask=jm, other=0.0)
    ey = tl.exp(py)  # once per column: the row loop below reuses it
    theta = tl.load(theta_ptr + t)
    e_star = tl.load(estar_ptr + t)
    h_row = h_ptr + t * s * s
    rows = tl.arange(0, ROWS)
    if PREFETCH:
        s_next = tl.load(h_row + (rows * s)[:, None] + j[None, :], mask=(rows < s)[:, None] & jm[None, :], other=0.0)
    else:
        s_next = tl.zeros([ROWS, COLS], dtype=h_ptr.dtype.element_ty)
    for i0 in range(0, s, ROWS):
        i = i0 + rows
        im = i < s
        e = (i * s)[:, None] + j[None, :]
        both = im[:, None] & jm[None, :]
        # Bounds-only masks: 16-byte vector loads (a per-winner mask gives 2-byte ones).
        if PREFETCH:
            sv = s_next
            s_next = tl.load(h_row + e + ROWS * s, mask=(i + ROWS < s)[:, None] & jm[None, :], other=0.0)
        else:
            sv = tl.load(h_row + e, mask=both, other=0.0)
        px = tl.load(lp_row + i, mask=im, other=0.0)
        key = _f32_key(px[:, None] + py[None, :])
        win = (key > theta) | ((key == theta) & (e < e_star))
        h = _act(sv.to(tl.float32), ACT, FAST) * (tl.exp(px)[:, None] * ey[None, :])
        tl.store(h_row + e, tl.where(win, h, 0.0).to(h_ptr.dtype.element_ty), mask=both)


def rule_applies(top_k: int, gate: str) -> bool:
    """Whether the layer's dense schedule runs from the rule: product gates (a softmax gate needs
    each token's sum over its winners) and K above the small-K router, which emits lists only."""
    return gate == "product" and top_k > SMALL_K_MAX


def dense_rule_launch(x, up, down, log_probs, theta, e_star, act: int, out, meta: dict | None = None) -> None:
    """out [T, d] = H down, H from S = x up^T by `_dense_rule_kernel` (layer inference hot path,
    unchecked): x, up [s*s, d], down of one dtype, contiguous; log_probs [T, 2s] fp32 (px then py, unit
    stride), theta / e_star [T] int32 from router.product_key_threshold_triton on them. Token
    chunks as experts.dense_two_gemms makes them."""
    s = log_probs.shape[1] // 2
    meta = meta or rule_pass_config()

    def from_rule(h, t0, t1):
        _dense_rule_kernel[rule_pass_grid(t1 - t0, s, meta)](
            h, log_probs[t0:t1], theta[t0:t1], e_star[t0:t1], s, log_probs.stride(0), ACT=act, **meta)
        return h

    dense_two_gemms(x, up, down, out, from_rule)
