"""Product-key router: exact top-K of S[i*s+j] = px[i] + py[j] in one Triton program per token.

K <= 64 (`_product_key_topk_small_kernel`, no workspace): per-axis top-min(K,s) by min(K,s) rounds
of "take the max" over packed (float-key, index) int64 keys, then the pruned candidate grid
(a+1)(b+1) <= K sits in registers and K more rounds pick the winners in order.

K > 64 (`_product_key_topk_kernel`), per token (one CTA):
1. Sort each axis (bitonic `tl.sort` on packed (float-key, index) int64 so ties go to the smaller
   index) and keep the top KA = min(K, s) of each, in a per-token workspace slice.
2. Only rank pairs (a, b) with (a+1)(b+1) <= K can be in the top-K (each has >= that many pairs
   at least as large). That set is covered exactly once by <= 2 isqrt(K) "lanes" (not KA rows):
   row lanes a < R = isqrt(K) with b < min(KA, K // (a+1)), and column lanes b < K // (R+1) with
   R <= a < min(KA, K // (b+1)); along a lane the sums are non-increasing (fp addition is
   monotone). The K-th largest score theta is found by bisection on the order-preserving int32
   image of the fp32 sum; each step counts "candidates >= mid" by a binary search per lane that
   only spans the lane's items still between the bracket's two counts (they shrink with it).
3. Every candidate > theta is emitted; ties at theta are admitted smallest expert index first
   (a second bisection over expert ids, only run when ties overflow K).
4. The K winners are written unsorted into the outputs, re-loaded, sorted (score desc, expert
   asc) with one bitonic sort of K elements and turned into gates (exp or softmax). Callers that
   only sum over the K (the layer's routed experts) skip the sort (SORTED=False): the same set,
   in emission order.

Cost per token: two sorts of s, ~25 bisection steps of <= 2 isqrt(K) narrowing binary searches,
and (SORTED only) one sort of K, then most of the time (H200, T=4096, s=320, K=2048: ~0.9 ms in a
phase split).
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .. import ops
from ._launch import MANY_TOKENS, Carver, check_device, check_out, next_pow2

# Int32 words of per-token scratch per axis rank: x vals, y vals, x idx, y idx, and per lane
# (<= 2 per axis rank) the emit prefix, tie prefix and strict counts.
_WS_ROWS = 10


@triton.jit
def _f32_key(v):
    # Order-preserving map fp32 -> int32 (negative floats: flip the magnitude bits).
    b = v.to(tl.int32, bitcast=True)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@triton.jit
def _key_f32(k):
    # The map above is an involution.
    b = k ^ ((k >> 31) & 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _sort_axis(row_ptr, s, vals_ptr, idx_ptr, KA, BLOCK_S: tl.constexpr):
    offs = tl.arange(0, BLOCK_S)
    v = tl.load(row_ptr + offs, mask=offs < s, other=float("-inf"))
    # Low word: larger for smaller index, so a descending sort breaks ties by smaller index
    # (padding lanes, index >= s, lose every tie against real lanes).
    packed = (_f32_key(v).to(tl.int64) << 32) | (BLOCK_S - 1 - offs).to(tl.int64)
    packed = tl.sort(packed, descending=True)
    idx = (BLOCK_S - 1) - (packed & 0xFFFFFFFF).to(tl.int32)
    sv = _key_f32((packed >> 32).to(tl.int32))
    keep = offs < KA
    tl.store(vals_ptr + offs, sv, mask=keep)
    tl.store(idx_ptr + offs, idx, mask=keep)


@triton.jit
def _lane_count_ge(fixed, lo, hi, var_ptr, base, theta, STEPS: tl.constexpr):
    """Per lane: lo + #{j in [lo, hi) : key(fixed + var[base + j]) >= theta}, given that every item
    before lo is >= theta and none from hi on is (items along a lane are non-increasing)."""
    for _ in tl.static_range(STEPS):
        active = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(var_ptr + base + mid, mask=active, other=0.0)
        ge = _f32_key(fixed + v).to(tl.int64) >= theta
        lo = tl.where(active & ge, mid + 1, lo)
        hi = tl.where(active & (~ge), mid, hi)
    return lo


@triton.jit
def _row_of(j, incl_ptr, NL, STEPS: tl.constexpr):
    """Lane holding flat item j given inclusive lane prefix sums: smallest l with incl[l] > j."""
    lo = tl.zeros_like(j)
    hi = tl.zeros_like(j) + NL
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
def _lane_item(lane, j, R):
    """Axis ranks (a, b) of item j of a lane: row lanes l < R hold (l, j), column lanes (R + j, l - R)."""
    is_row = lane < R
    a = tl.where(is_row, lane, R + j)
    b = tl.where(is_row, j, lane - R)
    return a, b


@triton.jit
def _tie_expert(j, xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, R, NL, STEPS_L: tl.constexpr):
    # Tie item j lives in lane l at item g[l] + offset (ties are contiguous inside a lane).
    lane, off = _row_of(j, q_ptr, NL, STEPS_L)
    a, b = _lane_item(lane, tl.load(g_ptr + lane) + off, R)
    e = tl.load(xi_ptr + a) * s + tl.load(yi_ptr + b)
    v = tl.load(xv_ptr + a) + tl.load(yv_ptr + b)
    return e, v


@triton.jit
def _tie_chunk(j0, n_tie, ch, xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, R, NL, STEPS_L: tl.constexpr):
    """Ties j0 + ch (of n_tie): (expert, score, mask of real ties)."""
    j = j0 + ch
    jm = j < n_tie
    e, v = _tie_expert(tl.where(jm, j, 0), xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, R, NL, STEPS_L)
    return e, v, jm


@triton.jit
def _store_ties(out_g, out_i, e, v, m, e_star, written):
    """Store the ties in m with expert < e_star after the `written` outputs; the new count."""
    sel = m & (e < e_star)
    pos = written + tl.cumsum(sel.to(tl.int32), axis=0) - 1
    tl.store(out_g + pos, v, mask=sel)
    tl.store(out_i + pos, e, mask=sel)
    return written + tl.sum(sel.to(tl.int32), axis=0)


@triton.jit
def _gates_of(score, km, SOFTMAX: tl.constexpr):
    """Gates of the K selected log-prob sums (lanes outside km ignored): softmax or exp."""
    if SOFTMAX:
        m = tl.max(tl.where(km, score, float("-inf")), axis=0)
        p = tl.where(km, tl.exp(score - m), 0.0)
        return p / tl.sum(p, axis=0)
    else:
        return tl.exp(score)


@triton.jit
def _ws_slices(t, wsf_ptr, wsi_ptr, KA):
    """Token t's slice of the large-K router's workspace (_WS_ROWS words per kept axis rank)."""
    base = t * (10 * KA)  # 10 = _WS_ROWS (a plain global: not readable inside a jit function)
    xv_ptr = wsf_ptr + base  # xv then yv: the lanes' items are read as one array
    yv_ptr = xv_ptr + KA
    xi_ptr = wsi_ptr + base + 2 * KA
    yi_ptr = xi_ptr + KA
    p_ptr = xi_ptr + 2 * KA  # inclusive prefix of lanes' emitted counts (<= 2 KA lanes)
    q_ptr = xi_ptr + 4 * KA  # inclusive prefix of lanes' tie counts
    g_ptr = xi_ptr + 6 * KA  # lanes' strictly-greater counts
    return xv_ptr, yv_ptr, xi_ptr, yi_ptr, p_ptr, q_ptr, g_ptr


@triton.jit
def _topk_threshold(t, px_ptr, py_ptr, wsf_ptr, wsi_ptr, s, K, KA, stride_px, stride_py,
                    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, CHUNK: tl.constexpr, STEPS_A: tl.constexpr,
                    STEPS_L: tl.constexpr, STEPS_N: tl.constexpr, RULE: tl.constexpr):
    """Steps 1-3 of the module docstring for token t: the K-th largest score's int32 key theta and
    e_star, such that token t's top-K are the searched candidates with key > theta plus those
    with key == theta and expert < e_star. Leaves the sorted axes and the lanes' emit / tie /
    strict prefixes in the token's workspace slice. Returns (theta, e_star, n_emit, n_gt, R, NL,
    cnt_ge): cnt_ge [BLOCK_L] the lanes' counts of candidates with key >= theta.

    RULE (the rule is applied to every expert, not only to the searched ranks): e_star is also
    exact when every searched tie is a winner, one above the largest of their ids, instead of
    s*s. A tie outside the searched ranks has at least K items ahead of it (its rank rectangle;
    equal values sort by index, so equal scores there have smaller ids), so its id is above every
    winning tie's: e.g. one dominant grid row whose K-th and (K+1)-th columns tie exactly."""
    xv_ptr, yv_ptr, xi_ptr, yi_ptr, p_ptr, q_ptr, g_ptr = _ws_slices(t, wsf_ptr, wsi_ptr, KA)

    _sort_axis(px_ptr + t * stride_px, s, xv_ptr, xi_ptr, KA, BLOCK_S)
    _sort_axis(py_ptr + t * stride_py, s, yv_ptr, yi_ptr, KA, BLOCK_S)
    tl.debug_barrier()

    # Lanes: row lanes a < R hold (a, b < min(KA, K // (a+1))), column lanes b < C hold
    # (R <= a < min(KA, K // (b+1)), b); R = min(KA, isqrt(K)), C = min(KA, K // (R+1)) cover the
    # candidate set (a+1)(b+1) <= K exactly once with R + C <= 2 isqrt(K) lanes (<= BLOCK_L).
    lanes = tl.arange(0, BLOCK_L)
    R = tl.minimum(tl.sum(((lanes + 1) * (lanes + 1) <= K).to(tl.int32), axis=0), KA)  # isqrt(K) < BLOCK_L
    NL = R + tl.minimum(KA, K // (R + 1))
    lmask = lanes < NL
    is_row = lanes < R
    fix_idx = tl.where(is_row, lanes, KA + lanes - R)  # x rank a of a row lane, KA + y rank b of a column
    fixed = tl.load(xv_ptr + fix_idx, mask=lmask, other=0.0)
    var_base = tl.where(is_row, KA, R)  # items: yv[j] along a row lane, xv[R + j] along a column lane
    lim = tl.minimum(K // (tl.where(is_row, lanes, lanes - R) + 1), KA)
    lane_len = tl.where(lmask, tl.where(is_row, lim, tl.maximum(lim - R, 0)), 0)

    # Bisection for theta = max{th : count(key >= th) >= K} with per-lane brackets: item counts
    # c_hi = count(>= hi) <= count(>= mid) <= c_lo = count(>= lo), so each lane's binary search
    # only spans its live items [c_hi, c_lo), which shrink with the bracket.
    lo = _f32_key(tl.load(xv_ptr + KA - 1) + tl.load(yv_ptr + KA - 1)).to(tl.int64)
    hi = _f32_key(tl.load(xv_ptr) + tl.load(yv_ptr)).to(tl.int64) + 1
    c_lo = lane_len
    c_hi = tl.zeros_like(lane_len)
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        cm = _lane_count_ge(fixed, c_hi, c_lo, xv_ptr, var_base, mid, STEPS_A)
        ok = tl.sum(cm, axis=0) >= K
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
        c_lo = tl.where(ok, cm, c_lo)
        c_hi = tl.where(ok, c_hi, cm)
    # Now hi == lo + 1: c_lo counts items >= theta = lo, c_hi items > theta.
    cnt_ge = c_lo
    cnt_gt = c_hi
    total_ge = tl.sum(cnt_ge, axis=0)
    n_gt = tl.sum(cnt_gt, axis=0)
    overflow = total_ge > K
    # Without overflow every candidate >= theta is a winner; with it, only the strict ones here.
    emit = tl.where(overflow, cnt_gt, cnt_ge)
    n_emit = tl.where(overflow, n_gt, total_ge)
    tl.store(p_ptr + lanes, tl.cumsum(emit, axis=0), mask=lmask)
    tl.store(q_ptr + lanes, tl.cumsum(cnt_ge - cnt_gt, axis=0), mask=lmask)
    tl.store(g_ptr + lanes, cnt_gt, mask=lmask)
    tl.debug_barrier()

    e_star = tl.zeros_like(n_gt) + s * s
    if RULE:
        if total_ge == K:  # no overflow: every searched tie is a winner
            n_tie = total_ge - n_gt
            ch = tl.arange(0, CHUNK)
            e_max = tl.zeros_like(n_tie) - 1
            for j0 in range(0, n_tie, CHUNK):
                e, _score, jm = _tie_chunk(j0, n_tie, ch, xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, R, NL, STEPS_L)
                e_max = tl.maximum(e_max, tl.max(tl.where(jm, e, -1), axis=0))
            e_star = e_max + 1
    if overflow:
        # Ties at theta exceed the K - n_gt free slots: admit the smallest expert ids. Bisection
        # for e_star = min{E : #{ties with expert < E} >= need}; exactly `need` are below it.
        # The first CHUNK ties (usually all: bf16 router logits tie at theta for most tokens, a
        # handful of items) stay in registers for all STEPS_N steps; any further chunks reload.
        need = K - n_gt
        n_tie = total_ge - n_gt
        ch = tl.arange(0, CHUNK)
        e0, _v0, m0 = _tie_chunk(0, n_tie, ch, xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, R, NL, STEPS_L)
        elo = tl.zeros_like(n_tie)
        ehi = tl.zeros_like(n_tie) + s * s
        for _ in range(STEPS_N):
            emid = (elo + ehi) // 2
            c = tl.sum((m0 & (e0 < emid)).to(tl.int32), axis=0)
            for j0 in range(CHUNK, n_tie, CHUNK):
                e, _score, jm = _tie_chunk(j0, n_tie, ch, xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, R, NL, STEPS_L)
                c += tl.sum((jm & (e < emid)).to(tl.int32), axis=0)
            # Once elo == ehi, emid == elo and c >= need, so the bounds stay put.
            ok = c >= need
            ehi = tl.where(ok, emid, ehi)
            elo = tl.where(ok, elo, emid + 1)
        e_star = elo
    return lo.to(tl.int32), e_star, n_emit, n_gt, R, NL, cnt_ge


@triton.jit
def _product_key_topk_kernel(
    px_ptr, py_ptr, gates_ptr, idx_ptr, wsf_ptr, wsi_ptr,
    s, K, KA, stride_px, stride_py,
    SOFTMAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr,
    CHUNK: tl.constexpr, STEPS_A: tl.constexpr, STEPS_L: tl.constexpr, STEPS_N: tl.constexpr,
    SORTED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    theta, e_star, n_emit, n_gt, R, NL, _cnt_ge = _topk_threshold(
        t, px_ptr, py_ptr, wsf_ptr, wsi_ptr, s, K, KA, stride_px, stride_py,
        BLOCK_S, BLOCK_L, CHUNK, STEPS_A, STEPS_L, STEPS_N, False)
    xv_ptr, yv_ptr, xi_ptr, yi_ptr, p_ptr, q_ptr, g_ptr = _ws_slices(t, wsf_ptr, wsi_ptr, KA)
    out_g = gates_ptr + t * K
    out_i = idx_ptr + t * K

    ch = tl.arange(0, CHUNK)
    for o0 in range(0, n_emit, CHUNK):
        o = o0 + ch
        om = o < n_emit
        lane, j = _row_of(o, p_ptr, NL, STEPS_L)
        a, b = _lane_item(lane, j, R)
        v = tl.load(xv_ptr + a, mask=om, other=0.0) + tl.load(yv_ptr + b, mask=om, other=0.0)
        e = tl.load(xi_ptr + a, mask=om, other=0) * s + tl.load(yi_ptr + b, mask=om, other=0)
        tl.store(out_g + o, v, mask=om)
        tl.store(out_i + o, e, mask=om)

    if n_emit < K:
        # Overflowing ties: the ones below e_star (exactly K - n_gt of them) after the strict winners.
        n_tie = tl.load(q_ptr + NL - 1)
        written = n_gt
        for j0 in range(0, n_tie, CHUNK):
            e, v, jm = _tie_chunk(j0, n_tie, ch, xv_ptr, yv_ptr, xi_ptr, yi_ptr, q_ptr, g_ptr, s, R, NL, STEPS_L)
            written = _store_ties(out_g, out_i, e, v, jm, e_star, written)
    tl.debug_barrier()

    ko = tl.arange(0, BLOCK_K)
    km = ko < K
    v = tl.load(out_g + ko, mask=km, other=0.0)
    if SORTED:
        # Final order: score descending, expert ascending on exact ties.
        e = tl.load(out_i + ko, mask=km, other=0)
        packed = (_f32_key(v).to(tl.int64) << 32) | (0x7FFFFFFF - e).to(tl.int64)
        packed = tl.where(km, packed, -9223372036854775807 - 1)
        packed = tl.sort(packed, descending=True)
        v = _key_f32((packed >> 32).to(tl.int32))
        e = 0x7FFFFFFF - (packed & 0xFFFFFFFF).to(tl.int32)
        tl.store(out_i + ko, e, mask=km)
    tl.store(out_g + ko, _gates_of(v, km, SOFTMAX), mask=km)


@triton.jit
def _product_key_threshold_kernel(
    px_ptr, py_ptr, theta_ptr, estar_ptr, wsf_ptr, wsi_ptr,
    s, K, KA, stride_px, stride_py,
    BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, CHUNK: tl.constexpr, STEPS_A: tl.constexpr,
    STEPS_L: tl.constexpr, STEPS_N: tl.constexpr,
):
    """Per token only (theta, e_star) of `_topk_threshold`: the top-K as a rule, not a list (the
    dense schedule's GEMM applies it to every (token, expert) it computes)."""
    t = tl.program_id(0).to(tl.int64)
    theta, e_star, _n_emit, _n_gt, _R, _NL, _cnt_ge = _topk_threshold(
        t, px_ptr, py_ptr, wsf_ptr, wsi_ptr, s, K, KA, stride_px, stride_py,
        BLOCK_S, BLOCK_L, CHUNK, STEPS_A, STEPS_L, STEPS_N, True)
    tl.store(theta_ptr + t, theta)
    tl.store(estar_ptr + t, e_star)


@triton.jit
def _take_max(v, idx, NONE: tl.constexpr):
    """One round of "take the max": (max value, smallest live index holding it, v and idx with that
    lane taken). Taken lanes hold (-inf, NONE), so ties, -inf included, go to the smallest live
    index. fp32 and int32 reductions: cheaper than one packed int64 key per lane."""
    m = tl.max(v, axis=0)
    i = tl.min(tl.where(v == m, idx, NONE), axis=0)
    hit = idx == i
    return m, i, tl.where(hit, float("-inf"), v), tl.where(hit, NONE, idx)


@triton.jit
def _small_topk_store(vx, vy, gates_ptr, idx_ptr, t, s, K, KA,
                      SOFTMAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr):
    """Exact top-K of vx[i] + vy[j] (both [BLOCK_S] fp32, -inf past s) for token t, in registers:
    KA rounds of "take the max" per axis (a sort of s = 1024 costs far more than 16 rounds), then
    K rounds over the pruned candidate grid; ties go to the smaller index; gates and ids stored."""
    offs = tl.arange(0, BLOCK_S)
    ax = offs
    ay = offs
    ra = tl.arange(0, BLOCK_A)
    xs = tl.full([BLOCK_A], float("-inf"), tl.float32)
    ys = tl.full([BLOCK_A], float("-inf"), tl.float32)
    xi = tl.zeros([BLOCK_A], dtype=tl.int32)
    yi = tl.zeros([BLOCK_A], dtype=tl.int32)
    for r in range(KA):
        mx, ix, vx, ax = _take_max(vx, ax, BLOCK_S)
        my, iy, vy, ay = _take_max(vy, ay, BLOCK_S)
        xs = tl.where(ra == r, mx, xs)
        ys = tl.where(ra == r, my, ys)
        # NaN log-probs match nothing: clamp so a stored id always names an expert.
        xi = tl.where(ra == r, tl.minimum(ix, s - 1), xi)
        yi = tl.where(ra == r, tl.minimum(iy, s - 1), yi)
    # Candidate grid over ranks (a, b) with (a+1)(b+1) <= K; ties -> the smaller expert id.
    valid = (ra[:, None] < KA) & (ra[None, :] < KA) & ((ra[:, None] + 1) * (ra[None, :] + 1) <= K)
    none = 0x7FFFFFFF
    score = tl.where(valid, xs[:, None] + ys[None, :], float("-inf"))
    expert = tl.where(valid, xi[:, None] * s + yi[None, :], none)
    score = tl.reshape(score, [BLOCK_A * BLOCK_A])
    expert = tl.reshape(expert, [BLOCK_A * BLOCK_A])
    rk = tl.arange(0, BLOCK_K)
    out_s = tl.zeros([BLOCK_K], dtype=tl.float32)
    out_e = tl.zeros([BLOCK_K], dtype=tl.int32)
    for r in range(K):
        m, e, score, expert = _take_max(score, expert, none)
        out_s = tl.where(rk == r, m, out_s)
        out_e = tl.where(rk == r, tl.minimum(e, s * s - 1), out_e)
    km = rk < K
    tl.store(gates_ptr + t * K + rk, _gates_of(out_s, km, SOFTMAX), mask=km)
    tl.store(idx_ptr + t * K + rk, out_e, mask=km)


@triton.jit
def _product_key_topk_small_kernel(
    px_ptr, py_ptr, gates_ptr, idx_ptr,
    s, K, KA, stride_px, stride_py,
    SOFTMAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Small K (<= 64): everything in registers, no workspace (see _small_topk_store)."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    vx = tl.load(px_ptr + t * stride_px + offs, mask=offs < s, other=float("-inf"))
    vy = tl.load(py_ptr + t * stride_py + offs, mask=offs < s, other=float("-inf"))
    _small_topk_store(vx, vy, gates_ptr, idx_ptr, t, s, K, KA, SOFTMAX, BLOCK_S, BLOCK_A, BLOCK_K)


@triton.jit
def _log_softmax_lanes(v, m):
    """log_softmax over the lanes in m (fp32), -inf elsewhere: v - max - log(sum(exp(v - max)))."""
    v = tl.where(m, v, float("-inf"))
    mx = tl.max(v, axis=0)
    e = tl.where(m, tl.exp(v - mx), 0.0)
    return tl.where(m, v - mx - tl.log(tl.sum(e, axis=0)), float("-inf"))


@triton.jit
def _router_logits_topk_small_kernel(
    logits_ptr, scale_ptr, shift_ptr, gates_ptr, idx_ptr,
    s, K, KA, stride_l,
    HAS_NORM: tl.constexpr, SOFTMAX: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Router tail for K <= 64 in one launch: the router GEMM's logits [T, 2s] (x axis, then y
    axis; any float dtype) -> eval batch-norm as l * scale + shift (fp32, optional) -> per-axis
    log-softmax (fp32) -> exact top-K and gates, as _product_key_topk_small_kernel."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    m = offs < s
    lx = tl.load(logits_ptr + t * stride_l + offs, mask=m, other=0.0).to(tl.float32)
    ly = tl.load(logits_ptr + t * stride_l + s + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_NORM:
        lx = lx * tl.load(scale_ptr + offs, mask=m, other=1.0) + tl.load(shift_ptr + offs, mask=m, other=0.0)
        ly = ly * tl.load(scale_ptr + s + offs, mask=m, other=1.0) + tl.load(shift_ptr + s + offs, mask=m, other=0.0)
    vx = _log_softmax_lanes(lx, m)
    vy = _log_softmax_lanes(ly, m)
    _small_topk_store(vx, vy, gates_ptr, idx_ptr, t, s, K, KA, SOFTMAX, BLOCK_S, BLOCK_A, BLOCK_K)


def _large_num_warps(s: int) -> int:
    # H200, T=4096, s=320: 4 warps beat 8 at every K measured, sorted or not (K=512: 0.48 -> 0.28 ms
    # sorted, 0.34 -> 0.22 unsorted; K=1024: 0.61 -> 0.46, 0.35 -> 0.25; K=2048: 1.24 -> 0.90,
    # 0.39 -> 0.29); larger s keeps the 8 it was measured with.
    return 4 if next_pow2(s) <= 512 else 8


def _small_num_warps(s: int, ka: int, many_tokens: bool = False) -> int:
    # Few warps keep the per-round max reductions inside a warp (shuffles, no block barrier);
    # enough warps to hold s and the (next_pow2 ka)^2 candidate keys in registers. With many
    # tokens (_launch.MANY_TOKENS) and ka <= 16, one warp: H200, T=4096, K=16, s=64 / 256 / 1024
    # took 23 / 31 / 77 us with 1 warp against 49 / 51 / 91 with 2 and 78 / 84 / 110 with 4
    # (scripts/sweep_small_k.py; fp32/int32 rounds of _take_max, which replaced int64 keys at
    # 42 / 55 / 110 us with 1 warp).
    if many_tokens and ka <= 16:
        return 1
    w = max(1, min(4, next_pow2(s) // 128))
    return max(w, 4 if ka > 32 else (2 if ka > 16 else 1))


# Largest K for the register-only path (its candidate grid is next_pow2(K)^2 int64 keys).
SMALL_K_MAX = 64


def _topk_outputs(T: int, K: int, dev, gates_out, indices_out):
    """The caller's gates [T,K] fp32 / indices [T,K] int32 outputs, checked, or new ones."""
    if gates_out is None:
        gates_out = torch.empty((T, K), dtype=torch.float32, device=dev)
    if indices_out is None:
        indices_out = torch.empty((T, K), dtype=torch.int32, device=dev)
    check_out(gates_out, (T, K), torch.float32, dev, "gates_out")
    check_out(indices_out, (T, K), torch.int32, dev, "indices_out")
    return gates_out, indices_out


def topk_kernel_config(grid_side: int, top_k: int, gate: str, sort: bool = True, many_tokens: bool = False):
    """(kernel, constexprs + num_warps) that `product_key_topk_triton` launches for (s, K, gate)
    (sort=False: the K > 64 kernel leaves the K winners in emission order; many_tokens: at least
    _launch.MANY_TOKENS tokens, the small-K kernel's throughput warps).

    The one place these choices live: the native TensorRT plugins compile the same variant ahead
    of time from it (trt_plugins/native)."""
    s, K = int(grid_side), int(top_k)
    ka = min(K, s)
    common = dict(SOFTMAX=(gate == "softmax"), BLOCK_S=max(16, next_pow2(s)), BLOCK_A=max(16, next_pow2(ka)),
                  BLOCK_K=max(16, next_pow2(K)))
    if K <= SMALL_K_MAX:
        return _product_key_topk_small_kernel, dict(common, num_warps=_small_num_warps(s, ka, many_tokens))
    block_k = common.pop("BLOCK_K")
    common.pop("BLOCK_A")
    block_l = max(16, next_pow2(2 * math.isqrt(K)))
    return _product_key_topk_kernel, dict(
        common,
        BLOCK_L=block_l,
        BLOCK_K=block_k,
        CHUNK=min(block_k, 512),
        STEPS_A=max(1, math.ceil(math.log2(ka + 1))),
        STEPS_L=max(1, math.ceil(math.log2(block_l + 1))),
        STEPS_N=max(1, math.ceil(math.log2(s * s + 1))),
        SORTED=bool(sort),
        num_warps=_large_num_warps(s),
    )


def threshold_kernel_config(grid_side: int, top_k: int) -> dict:
    """Constexprs + num_warps of `_product_key_threshold_kernel` (top_k > SMALL_K_MAX): those of
    the top-K kernel it shares `_topk_threshold` with."""
    _, meta = topk_kernel_config(grid_side, top_k, "product", sort=False)
    for emit_only in ("SOFTMAX", "BLOCK_K", "SORTED"):
        meta.pop(emit_only)
    return meta


def product_key_threshold_triton(
    log_probs_x: torch.Tensor,
    log_probs_y: torch.Tensor,
    top_k: int,
    *,
    theta_out: torch.Tensor | None = None,
    estar_out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's exact product-key top-K as a rule instead of a list: theta [T] int32 (the K-th
    largest score's order-preserving int32 key, `_f32_key`) and e_star [T] int32. Expert
    e = i*s + j with score v = px[i] + py[j] is a winner iff key(v) > theta, or key(v) == theta
    and e < e_star. top_k in (SMALL_K_MAX, min(4096, s*s)].

    Applied to every expert, the rule admits product_key_topk_triton's set, ties just outside the
    ranks it searches included (`_topk_threshold`'s RULE).
    With outputs and workspace given: no allocation, no host sync."""
    T, s = ops.check_topk_inputs(log_probs_x, log_probs_y, top_k, "product")
    check_device(log_probs_x, log_probs_y)
    dev = log_probs_x.device
    K = int(top_k)
    if not SMALL_K_MAX < K <= 4096:
        raise ops.OmniMoEInputError(f"the threshold router takes {SMALL_K_MAX} < top_k <= 4096, got {K}")
    if log_probs_x.stride(1) != 1 or log_probs_y.stride(1) != 1:
        raise ops.OmniMoEInputError("router log-probs must have unit stride along s")
    outs = []
    for name, t in (("theta_out", theta_out), ("estar_out", estar_out)):
        if t is None:
            t = torch.empty(T, dtype=torch.int32, device=dev)
        check_out(t, (T,), torch.int32, dev, name)
        outs.append(t)
    if T:
        ka = min(K, s)
        ws = Carver(workspace, topk_workspace_bytes(T, s, K), dev).take(T * _WS_ROWS * ka, torch.int32)
        _product_key_threshold_kernel[(T,)](
            log_probs_x, log_probs_y, outs[0], outs[1], ws.view(torch.float32), ws,
            s, K, ka, log_probs_x.stride(0), log_probs_y.stride(0), **threshold_kernel_config(s, K),
        )
    return outs[0], outs[1]


def topk_workspace_bytes(max_tokens: int, grid_side: int, top_k: int) -> int:
    """Scratch for `product_key_topk_triton`: none for K <= 64, else 7 int32 words per token per
    kept axis rank."""
    if int(top_k) <= SMALL_K_MAX:
        return 0
    ka = min(int(top_k), int(grid_side))
    return int(max_tokens) * _WS_ROWS * ka * 4


def product_key_topk_triton(
    log_probs_x: torch.Tensor,
    log_probs_y: torch.Tensor,
    top_k: int,
    gate: str,
    *,
    gates_out: torch.Tensor | None = None,
    indices_out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    sort: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """gates [T,K] fp32, indices [T,K] int32: exact product-key top-K (ops.product_key_topk_reference).

    sort=False: the same K (gate, expert) pairs per token in no particular order (K > 64 then
    skips its final sort); for callers that only sum over them.
    With gates_out, indices_out and workspace given: no allocation, no host sync, launches on
    the current stream only (TensorRT enqueue / CUDA-graph capture safe).
    """
    T, s = ops.check_topk_inputs(log_probs_x, log_probs_y, top_k, gate)
    check_device(log_probs_x, log_probs_y)
    dev = log_probs_x.device
    K = int(top_k)
    gates_out, indices_out = _topk_outputs(T, K, dev, gates_out, indices_out)
    if T == 0:
        return gates_out, indices_out
    if log_probs_x.stride(1) != 1 or log_probs_y.stride(1) != 1:
        raise ops.OmniMoEInputError("router log-probs must have unit stride along s")
    if K > 4096:
        raise ops.OmniMoEInputError(f"the Triton router supports top_k <= 4096, got {K}")
    ka = min(K, s)
    kernel, meta = topk_kernel_config(s, K, gate, sort, T >= MANY_TOKENS)
    if K <= SMALL_K_MAX:
        kernel[(T,)](
            log_probs_x, log_probs_y, gates_out, indices_out,
            s, K, ka, log_probs_x.stride(0), log_probs_y.stride(0), **meta,
        )
        return gates_out, indices_out
    carver = Carver(workspace, topk_workspace_bytes(T, s, K), dev)
    ws = carver.take(T * _WS_ROWS * ka, torch.int32)
    kernel[(T,)](
        log_probs_x, log_probs_y, gates_out, indices_out, ws.view(torch.float32), ws,
        s, K, ka, log_probs_x.stride(0), log_probs_y.stride(0), **meta,
    )
    return gates_out, indices_out


def router_logits_kernel_config(grid_side: int, top_k: int, gate: str, has_norm: bool, many_tokens: bool = False) -> dict:
    """Constexprs + num_warps of `_router_logits_topk_small_kernel` (K <= SMALL_K_MAX only);
    `many_tokens`: at least _launch.MANY_TOKENS tokens per launch."""
    s, K = int(grid_side), int(top_k)
    ka = min(K, s)
    return dict(HAS_NORM=bool(has_norm), SOFTMAX=(gate == "softmax"), BLOCK_S=max(16, next_pow2(s)),
                BLOCK_A=max(16, next_pow2(ka)), BLOCK_K=max(16, next_pow2(K)), num_warps=_small_num_warps(s, ka, many_tokens))


_router_logits_config_cached = functools.lru_cache(maxsize=64)(router_logits_kernel_config)


def _router_logits_topk_launch(logits, scale, shift, s, K, gate, gates_out, indices_out) -> None:
    """Unchecked launch of `_router_logits_topk_small_kernel` (layer inference hot path)."""
    meta = _router_logits_config_cached(s, K, gate, scale is not None, logits.shape[0] >= MANY_TOKENS)
    if scale is None:
        scale = shift = logits  # never read (HAS_NORM=False)
    _router_logits_topk_small_kernel[(logits.shape[0],)](
        logits, scale, shift, gates_out, indices_out, s, K, min(K, s), logits.stride(0), **meta
    )


def router_logits_topk_triton(
    logits: torch.Tensor,
    scale: torch.Tensor | None,
    shift: torch.Tensor | None,
    top_k: int,
    gate: str,
    *,
    gates_out: torch.Tensor | None = None,
    indices_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router tail for top_k <= SMALL_K_MAX in one launch: logits [T, 2s] (both axes' router GEMM
    output, x then y) -> optional eval batch-norm l * scale + shift (float32 [2s]) -> per-axis
    log-softmax -> exact product-key top-K -> gates [T,K] fp32, indices [T,K] int32.

    Equals product_key_topk_triton on log_softmax(l * scale + shift) up to the rounding of the
    log-softmax (a different expert only at a near-tie). No allocation with outputs given."""
    if logits.dim() != 2 or logits.shape[1] % 2 or logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ops.OmniMoEInputError(f"logits must be a float [T, 2s] tensor, got {logits.dtype} {tuple(logits.shape)}")
    T, s = logits.shape[0], logits.shape[1] // 2
    if gate not in ("product", "softmax"):
        raise ops.OmniMoEInputError(f"gate must be product or softmax, got {gate!r}")
    K = int(top_k)
    if not 1 <= K <= min(SMALL_K_MAX, s * s):
        raise ops.OmniMoEInputError(f"top_k must satisfy 1 <= top_k <= min({SMALL_K_MAX}, N={s * s}), got {K}")
    if (scale is None) != (shift is None):
        raise ops.OmniMoEInputError("give both scale and shift, or neither")
    if logits.stride(1) != 1:
        raise ops.OmniMoEInputError("logits must have unit stride along the last axis")
    tensors = [logits]
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None:
            if t.shape != (2 * s,) or t.dtype != torch.float32 or not t.is_contiguous():
                raise ops.OmniMoEInputError(f"{name} must be a contiguous float32 [{2 * s}] tensor")
            tensors.append(t)
    check_device(*tensors)
    dev = logits.device
    gates_out, indices_out = _topk_outputs(T, K, dev, gates_out, indices_out)
    if T:
        _router_logits_topk_launch(logits, scale, shift, s, K, gate, gates_out, indices_out)
    return gates_out, indices_out
