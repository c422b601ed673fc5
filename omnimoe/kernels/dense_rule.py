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

from .experts import _act
from .router import SMALL_K_MAX, _f32_key

# Token chunks keep the [t, N] hidden buffer at most this many elements (experts._dense_launch's).
_CHUNK_ELEMENTS = 1 << 29
# Experts per program of the rule pass, and its warps (N < 2^24: the grid-row arithmetic).
RULE_BLOCK = 2048
RULE_WARPS = 4


@triton.jit
def _dense_rule_kernel(h_ptr, lp_ptr, theta_ptr, estar_ptr, N, s, stride_lp, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """In place over h [T, N] (= S on entry): h[t, e] = act(S[t, e]) * exp(px[t, i] + py[t, j]) for
    the winners e = i*s + j of token t's rule, else 0. lp [T, >= 2s] fp32 rows: px then py."""
    t = tl.program_id(0).to(tl.int64)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    em = e < N
    # Grid row i = e // s by a float product and one correction (exact for e < 2^24): an integer
    # division per element bounded the pass by arithmetic.
    i = (e.to(tl.float32) * (1.0 / s.to(tl.float32))).to(tl.int32)
    r = e - i * s
    i = tl.where(r >= s, i + 1, tl.where(r < 0, i - 1, i))
    lp_row = lp_ptr + t * stride_lp
    score = tl.load(lp_row + i, mask=em, other=0.0) + tl.load(lp_row + s + (e - i * s), mask=em, other=0.0)
    key = _f32_key(score)
    theta = tl.load(theta_ptr + t)
    win = em & ((key > theta) | ((key == theta) & (e < tl.load(estar_ptr + t))))
    sv = tl.load(h_ptr + t * N + e, mask=win, other=0.0).to(tl.float32)
    h = tl.where(win, _act(sv, ACT) * tl.exp(score), 0.0)
    tl.store(h_ptr + t * N + e, h.to(h_ptr.dtype.element_ty), mask=em)


def rule_applies(top_k: int, gate: str, num_experts: int) -> bool:
    """Whether the layer's dense schedule runs from the rule: product gates (a softmax gate needs
    each token's sum over its winners), K above the small-K router, which emits lists only, and
    N < 2^24 (the pass's grid-row arithmetic)."""
    return gate == "product" and top_k > SMALL_K_MAX and num_experts < 1 << 24


def dense_rule_launch(x, up, down, log_probs, theta, e_star, act: int, out) -> None:
    """out [T, d] = H down, H from S = x up^T by `_dense_rule_kernel` (layer inference hot path,
    unchecked): x, up, down of one dtype, contiguous; log_probs [T, 2s] fp32 (px then py, unit
    stride), theta / e_star [T] int32 from router.product_key_threshold_triton on them."""
    T = x.shape[0]
    N = up.shape[0]
    s = log_probs.shape[1] // 2
    rows = max(1, min(T, _CHUNK_ELEMENTS // N))
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        h = torch.mm(x[t0:t1], up.t())
        _dense_rule_kernel[(t1 - t0, triton.cdiv(N, RULE_BLOCK))](
            h, log_probs[t0:t1], theta[t0:t1], e_star[t0:t1], N, s, log_probs.stride(0),
            ACT=act, BLOCK=RULE_BLOCK, num_warps=RULE_WARPS)
        torch.mm(h, down, out=out[t0:t1])
