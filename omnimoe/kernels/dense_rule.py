"""Dense schedule of the routed experts driven by the router's rule instead of its pair list.

At high routing density (K/N >= experts.DENSE_MIN_DENSITY) the layer computes the routed experts
as two GEMMs over every (token, expert): Y = H Down, H = act(X Up^T) o G. `experts._dense_launch`
builds H from the router's K (gate, expert) pairs per token: it zeroes a [T, N] buffer, then
gathers S and scatters H at each pair (H200, paper_k4096: 0.25 + 0.43 ms of its 3.2 ms, and the
router's pair list another 0.13 ms).

Here the router emits each token's top-K as a rule (router.product_key_threshold_triton: theta
and e_star, no list), and one streaming pass turns S = X Up^T (cuBLAS, rounded to x's dtype as
before) into H in place: expert e = i*s + j is a winner iff key(px[i] + py[j]) > theta, or
== theta and e < e_star; its gate is exp(px[i] + py[j]) (product gates: the value the router
would have emitted, bit for bit); H = act(S) * gate for winners, else 0, rounded once. S is
only read where a winner sits. The second GEMM stays cuBLAS. (A Triton first GEMM with the rule
in its epilogue was slower: 4.7 ms against 1.17 for cuBLAS alone at paper_k4096, its gathers of
px / py per tile took every register; scripts/sweep_dense_rule.py times this one.)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import next_pow2
from .experts import _act
from .router import SMALL_K_MAX, _f32_key

# Token chunks keep the [t, N] hidden buffer at most this many elements (experts._dense_launch's).
_CHUNK_ELEMENTS = 1 << 29
# Elements per program of the rule pass (ROWS grid rows of next_pow2(s) lanes), and its warps.
RULE_ELEMENTS = 4096
RULE_WARPS = 4


def rule_pass_config(s: int) -> dict:
    """Constexprs + num_warps of `_dense_rule_kernel` for grid side s."""
    block_s = next_pow2(s)
    return dict(ROWS=max(1, RULE_ELEMENTS // block_s), BLOCK_S=block_s, num_warps=RULE_WARPS)


@triton.jit
def _dense_rule_kernel(h_ptr, lp_ptr, theta_ptr, estar_ptr, s, stride_lp, ACT: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    """In place over h [T, s*s] (= S on entry), grid rows i of program (t, r): h[t, i*s + j] =
    act(S[t, i*s + j]) * exp(px[t, i] + py[t, j]) for the winners of token t's rule, else 0.
    lp [T, >= 2s] fp32 rows: px then py. Two-dimensional (row, column) indices: no division."""
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    j = tl.arange(0, BLOCK_S)
    im = i < s
    jm = j < s
    both = im[:, None] & jm[None, :]
    lp_row = lp_ptr + t * stride_lp
    score = tl.load(lp_row + i, mask=im, other=0.0)[:, None] + tl.load(lp_row + s + j, mask=jm, other=0.0)[None, :]
    key = _f32_key(score)
    theta = tl.load(theta_ptr + t)
    e = i[:, None] * s + j[None, :]
    win = both & ((key > theta) | ((key == theta) & (e < tl.load(estar_ptr + t))))
    h_row = h_ptr + t * s * s
    sv = tl.load(h_row + e, mask=win, other=0.0).to(tl.float32)  # S is read only where a winner sits
    h = tl.where(win, _act(sv, ACT) * tl.exp(score), 0.0)
    tl.store(h_row + e, h.to(h_ptr.dtype.element_ty), mask=both)


def rule_applies(top_k: int, gate: str) -> bool:
    """Whether the layer's dense schedule runs from the rule: product gates (a softmax gate needs
    each token's sum over its winners) and K above the small-K router, which emits lists only."""
    return gate == "product" and top_k > SMALL_K_MAX


def dense_rule_launch(x, up, down, log_probs, theta, e_star, act: int, out) -> None:
    """out [T, d] = H down, H from S = x up^T by `_dense_rule_kernel` (layer inference hot path,
    unchecked): x, up [s*s, d], down of one dtype, contiguous; log_probs [T, 2s] fp32 (px then py, unit
    stride), theta / e_star [T] int32 from router.product_key_threshold_triton on them."""
    T = x.shape[0]
    N = up.shape[0]
    s = log_probs.shape[1] // 2
    rows = max(1, min(T, _CHUNK_ELEMENTS // N))
    meta = rule_pass_config(s)
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        h = torch.mm(x[t0:t1], up.t())
        _dense_rule_kernel[(t1 - t0, triton.cdiv(s, meta["ROWS"]))](
            h, log_probs[t0:t1], theta[t0:t1], e_star[t0:t1], s, log_probs.stride(0), ACT=act, **meta)
        torch.mm(h, down, out=out[t0:t1])
