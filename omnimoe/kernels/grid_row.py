"""Grid-line ("panel") schedule of the routed experts for product-key routing (issue 11).

Expert e = i*s + j sits in row i, column j of the s x s product-key grid. A token's K experts form
a staircase in its rank space (x rank a, y rank b, roughly (a+1)(b+1) <= K): its top rows hold many
of its experts, and so do its top columns. A panel is one grid line, row or column:

  row panel (i, q):    experts i*s + q*PWR + k        (k < PWR: part q of row i)
  column panel (j, q): experts (q*PWR + k)*s + j      (part q of column j)
  (P parts per line of PWR = ceil(s / P) experts, P = 1 when s <= _MAX_CHUNKS * BC).

Each pair (t, e) goes to its row panel or its column panel: whichever holds more of token t's
pairs (row on ties), so a token's staircase is covered by its few top rows and top columns
(benchmark routing, s = 320: ~21 / 46 / 68 panels per token at K = 512 / 2048 / 4096, against
~80 / 162 / 212 rows with row panels only). The pairs are counting-sorted by (panel, token):

  line counts: pairs of each token per row panel and per column panel (one program per token,
  register histograms; N up to 1600^2, see GR_MAX_LINE_BINS);
  slots of p = the distinct tokens with at least one pair assigned to p (a counting sort of the
  T*K pairs by key p*T + t, with the slots compacted by a second scan).
  per (panel p, block of BM slots):  S = X_slots U_p^T (tensor cores, fp32 accumulators),
  H = act(S) o G (G = the slots' gates in p, duplicated ids add), Y[slot tokens] += H V_p (fp32
  atomics into a [T, d] fp32 accumulator), then one cast to x's dtype.

FLOPs ~ 4*T*L*PWR*d for L panels per token (vs 4*T*N*d dense) and no per-pair row traffic: pairs
only carry a position and a gate. G is built per block in a per-program fp32 scratch tile
(zeroed, gates scattered with atomics, read back after a barrier); S is computed one BC-chunk of
the panel at a time and H = act(S) o G stored to a per-program H tile, which the second product
reads back (fp32 accumulators in registers for whole panels spilled on sm_90; measured slower).
The main kernel is persistent: a fixed number of programs walks the scanned list of
(panel, block) work items. Everything is sized from T, K, N and d.

From the router's rule (rule_launch: the layer, product gates, K > 64, P = 1): no pair list. One
router kernel (_gr_rule_route_kernel) finds each token's top-K as a rule (theta, e_star) and the
fewest grid lines covering its candidates, and enters the token in each with an atomic slot count;
a slot carries the rank span it covers, and the panel kernel (RULE) scatters each span's winners,
checked against the rule, into the gate tile. The counting sort and the router's pair list go.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .experts import _SCAN_TOP_BLOCK, _act, _scan_top_kernel
from .router import SMALL_K_MAX, _f32_key, _row_of, _topk_threshold, _ws_slices

# Experts per tensor-core chunk of a panel, and at most this many chunks per panel (bounds the
# per-program G / H scratch tiles). s = 320 (N = 102400): one panel of 5 chunks per row.
GR_BC = 64
_MAX_CHUNKS = 5
# Slots per block (rows of S and of the atomic update), d step of each stage, warps, stages.
GR_BM = 128
GR_BD = 128
GR_BD2 = 128
GR_WARPS = 8
GR_STAGES = 4
# Slots per block for fp32 inputs.
GR_FP32_BM = 64
# The panel kernel from the router's rule (rule_launch, 16-bit): 64 slots, 4 warps, 3 stages, so that
# two blocks share an SM and one's gate scatter (dependent loads) overlaps the other's products;
# 2 persistent programs per SM. H200, T = 4096, the schedule with its router (scripts/ab_grid_panel.py
# --rule): paper_min 1.008 ms, paper_k2048 1.696, against 1.060 / 1.821 with the pair-list tiles
# above (3 programs per SM and 2 stages were slower in trials not committed).
GR_RULE_BM = 64
GR_RULE_WARPS = 4
GR_RULE_STAGES = 3
GR_RULE_PROGRAMS = 264
# Persistent programs (each owns one G and one H scratch tile of BM x NCH*BC fp32): 3 per H200 SM
# (measured at K = 512 / 1024 / 2048, T = 4096: 0.03-0.08 ms faster than 2 per SM).
GR_PROGRAMS = 396
# Bins of a token's per-direction panel histogram (its panels + one for invalid ids), at most: the
# schedule needs s*P < GR_MAX_LINE_BINS (N = 1M: s*P = 4096).
GR_MAX_LINE_BINS = 8192
# Pairs per step of the line-count kernel.
GR_LINE_CHUNK = 1024
# Pairs per program of the sort kernels; scan block of the key counters.
GR_SORT_BLOCK = 1024
GR_SCAN_BLOCK = 1024
# Pairs per step of the panel kernel's gate scatter (more loads in flight: 2048 is 0.04 ms faster than
# 256 at K = 512 and 0.17 ms at K = 4096, T = 4096: scripts/ab_grid_panel.py --variants
# "base;base:GATE_BLOCK=256").
GR_GATE_BLOCK = 2048
_CAST_BLOCK = 4096
# Panels per step of the single-program work-list kernel.
_BLOCKS_BLOCK = 1024


# Shared memory the 16-bit panel kernel needs per block (144 KiB on sm_80, 192 KiB on sm_90):
# GPUs that allow less (sm_86/89/120: ~99 KiB) run the hybrid schedule instead.
GR_MIN_SHARED_BYTES = 144 * 1024


def fits_device(device) -> bool:
    """Whether the panel kernel's shared memory fits `device` (the CPU interpreter has no limit).
    The native plugins decide the same from the compiled kernel's exact size at load time."""
    device = torch.device(device)
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin >= GR_MIN_SHARED_BYTES


def grid_side(N: int) -> int | None:
    """s when N = s*s, else None (the schedule needs the product-key grid)."""
    s = math.isqrt(int(N))
    return s if s * s == int(N) and s > 0 else None


def panel_geometry(N: int) -> tuple[int, int, int, int]:
    """(s, P, PWR, NCH): grid side, panels per line (row or column), experts per panel, BC-chunks
    per panel. The panels: s*P row panels, then s*P column panels."""
    s = grid_side(N)
    P = max(1, triton.cdiv(s, _MAX_CHUNKS * GR_BC))
    pwr = triton.cdiv(s, P)
    return s, P, pwr, triton.cdiv(pwr, GR_BC)


def num_panels(N: int) -> int:
    """Row panels and column panels: 2*s*P."""
    s, P, _, _ = panel_geometry(N)
    return 2 * s * P


def max_tokens(K: int, N: int) -> int:
    """The most tokens whose keys (2*s*P*T + 1) and pairs (T*K) fit int32; 0 if N is no square or
    has more than GR_MAX_LINE_BINS - 1 panels per direction (N beyond ~2.6 M experts)."""
    if grid_side(N) is None or K <= 0:
        return 0
    s, P, _, _ = panel_geometry(N)
    if s * P + 1 > GR_MAX_LINE_BINS:
        return 0
    return min((2**31 - 2) // num_panels(N), (2**31 - 1) // int(K))


def supported(T: int, K: int, N: int) -> bool:
    """The schedule's preconditions: a perfect-square N and int32 key / pair arithmetic."""
    return 0 < T <= max_tokens(K, N)


def _sizes(T, K, N, d, bm=None):
    s, P, pwr, nch = panel_geometry(N)
    npanels = num_panels(N)
    nkey1 = npanels * T + 1
    nb = triton.cdiv(nkey1, GR_SCAN_BLOCK)
    tk = T * K
    nslots = min(tk, npanels * T)
    bm = bm or min(GR_BM, GR_FP32_BM)
    work_upper = min(npanels * triton.cdiv(T, bm), triton.cdiv(nslots, bm) + npanels)
    nprog = max(1, min(GR_PROGRAMS, work_upper))
    return dict(s=s, P=P, pwr=pwr, nch=nch, npanels=npanels, nkey1=nkey1, nb=nb, tk=tk, nslots=nslots,
                nprog=nprog, gw=nch * GR_BC)


def workspace_bytes(max_tokens: int, top_k: int, num_experts: int, hidden_size: int) -> int:
    """Scratch of the grid-row schedule (0 when N is not a perfect square)."""
    from ._launch import align

    if grid_side(num_experts) is None or max_tokens <= 0:
        return 0
    z = _sizes(int(max_tokens), int(top_k), int(num_experts), int(hidden_size))
    return (
        align(z["nkey1"] * 4) * 4  # line counts, counts, pair offsets, slot offsets
        + align(z["nb"] * 4) * 2  # block sums of both scans
        + align(z["tk"] * 4) * 4  # rank, sorted column, sorted gate, sorted slot
        + align(z["nslots"] * 4) * 2  # slot token, slot's first pair
        + align((z["npanels"] + 1) * 4)  # work-item offsets per panel
        + align(GR_PROGRAMS * _tile_rows() * z["gw"] * 4) * 2  # G and H scratch tiles
        + align(int(max_tokens) * int(hidden_size) * 4)  # fp32 accumulator for y
    )


# ----------------------------------------------------------------------------- sort by (panel, token)
@triton.jit
def _gr_line_panels(e, S, P, PWR):
    """Expert e's row panel and column panel (numbers < 2*S*P), and its place in each."""
    i = e // S
    j = e - i * S
    qr = j // PWR
    qc = i // PWR
    return i * P + qr, j - qr * PWR, (S + j) * P + qc, i - qc * PWR


@triton.jit
def _gr_key(e, t, m, lcounts_ptr, S, P, PWR, T):
    """The panel pair (t, e) is assigned to: the line (row or column panel) holding more of token
    t's pairs, the row on ties; returns its sort key (panel * T + t) and the pair's place in it."""
    rp, rpos, cp, cpos = _gr_line_panels(e, S, P, PWR)
    counts = lcounts_ptr + t * (2 * S * P)  # token-major: a token's pairs read one row of counts
    row = tl.load(counts + rp, mask=m, other=0) >= tl.load(counts + cp, mask=m, other=0)
    return tl.where(row, rp, cp) * T + t, tl.where(row, rpos, cpos)


@triton.jit
def _gr_pair(idx_ptr, offs, TK, N):
    """Pair ids at offs: (expert, mask of real pairs with an in-range id; out-of-range ids read 0)."""
    m = offs < TK
    e = tl.load(idx_ptr + offs, mask=m, other=0)
    valid = m & (e >= 0) & (e < N)
    return tl.where(valid, e, 0), valid


@triton.jit
def _gr_line_count_kernel(idx_ptr, lcounts_ptr, K, N, S, P, PWR, T, NB: tl.constexpr, CH: tl.constexpr):
    """lcounts[t * 2*S*P + panel] = token t's pairs in each row panel and each column panel, every
    entry written: one program per token, histograms in registers (global atomics would serialise
    on a token's top lines, which hold up to s of its pairs each), one contiguous row per token."""
    t = tl.program_id(0)
    kk = tl.arange(0, CH)
    n_lines = S * P  # also the bin of invalid ids (NB > S * P)
    h_row = tl.zeros([NB], dtype=tl.int32)
    h_col = tl.zeros([NB], dtype=tl.int32)
    for k0 in range(0, K, CH):
        k = k0 + kk
        e = tl.load(idx_ptr + t.to(tl.int64) * K + k, mask=k < K, other=-1)
        valid = (k < K) & (e >= 0) & (e < N)
        rp, _, cp, _ = _gr_line_panels(tl.where(valid, e, 0), S, P, PWR)  # rows < n_lines <= columns
        h_row += tl.histogram(tl.where(valid, rp, n_lines), NB)
        h_col += tl.histogram(tl.where(valid, cp - n_lines, n_lines), NB)
    b = tl.arange(0, NB)
    bm = b < n_lines
    counts = lcounts_ptr + t.to(tl.int64) * (2 * n_lines)
    tl.store(counts + b, h_row, mask=bm)
    tl.store(counts + n_lines + b, h_col, mask=bm)


@triton.jit
def _gr_histogram_kernel(idx_ptr, lcounts_ptr, counts_ptr, rank_ptr, TK, K, N, S, P, PWR, T, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e, valid = _gr_pair(idx_ptr, offs, TK, N)
    key, _ = _gr_key(e, offs // K, valid, lcounts_ptr, S, P, PWR, T)
    r = tl.atomic_add(counts_ptr + key, 1, mask=valid, sem="relaxed")
    tl.store(rank_ptr + offs, r, mask=offs < TK)


@triton.jit
def _gr_scan_blocks_kernel(counts_ptr, offsets_ptr, slotoff_ptr, bsums_ptr, bslots_ptr, N1, BLOCK: tl.constexpr):
    """Block-local exclusive scans of the pair counts and of the non-empty flags (slots)."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N1
    c = tl.load(counts_ptr + offs, mask=m, other=0)
    f = (c > 0).to(tl.int32)
    tl.store(offsets_ptr + offs, tl.cumsum(c, axis=0) - c, mask=m)
    tl.store(slotoff_ptr + offs, tl.cumsum(f, axis=0) - f, mask=m)
    tl.store(bsums_ptr + pid, tl.sum(c, axis=0))
    tl.store(bslots_ptr + pid, tl.sum(f, axis=0))


@triton.jit
def _gr_start(off_ptr, bs_ptr, key, SCAN_BLOCK: tl.constexpr):
    return tl.load(off_ptr + key) + tl.load(bs_ptr + key // SCAN_BLOCK)


@triton.jit
def _gr_scatter_kernel(idx_ptr, g_ptr, lcounts_ptr, rank_ptr, offsets_ptr, slotoff_ptr, bsums_ptr, bslots_ptr,
                       scol_ptr, sgate_ptr, sslot_ptr, slot_tok_ptr, slot_pair_ptr,
                       TK, K, N, S, P, PWR, T, SCAN_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e, m = _gr_pair(idx_ptr, offs, TK, N)
    t = offs // K
    key, col = _gr_key(e, t, m, lcounts_ptr, S, P, PWR, T)
    kb = key // SCAN_BLOCK
    r = tl.load(rank_ptr + offs, mask=m, other=0)
    pos = tl.load(offsets_ptr + key, mask=m, other=0) + tl.load(bsums_ptr + kb, mask=m, other=0) + r
    slot = tl.load(slotoff_ptr + key, mask=m, other=0) + tl.load(bslots_ptr + kb, mask=m, other=0)
    tl.store(scol_ptr + pos, col, mask=m)
    tl.store(sgate_ptr + pos, tl.load(g_ptr + offs, mask=m, other=0.0), mask=m)
    tl.store(sslot_ptr + pos, slot, mask=m)
    first = m & (r == 0)  # the slot's first pair (rank 0 sits at the group's start)
    tl.store(slot_tok_ptr + slot, t, mask=first)
    tl.store(slot_pair_ptr + slot, pos, mask=first)


@triton.jit
def _gr_blocks_kernel(slotoff_ptr, bslots_ptr, blkoff_ptr, NP, T, BM: tl.constexpr,
                      SCAN_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """One program: blkoff[p] = work items (blocks of BM slots) of the panels before p; blkoff[NP] = all."""
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for p0 in range(0, NP, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        m = p < NP
        k0 = tl.where(m, p * T, 0)
        k1 = tl.where(m, (p + 1) * T, 0)
        s0 = tl.load(slotoff_ptr + k0) + tl.load(bslots_ptr + k0 // SCAN_BLOCK)
        s1 = tl.load(slotoff_ptr + k1) + tl.load(bslots_ptr + k1 // SCAN_BLOCK)
        nb = tl.where(m, (s1 - s0 + BM - 1) // BM, 0)
        tl.store(blkoff_ptr + p, carry + tl.cumsum(nb, axis=0) - nb, mask=m)
        carry += tl.sum(nb, axis=0)
    tl.store(blkoff_ptr + NP, carry)


# ----------------------------------------------------------------------------- slots from the router's rule
# Bits of each field of a rule slot's span (rank of the slot's line, first and end rank along it).
_SPAN_BITS = 10


@triton.jit
def _gr_rule_route_kernel(lp_ptr, rule_ptr, pcount_ptr, pslot_ptr, pspan_ptr, wsf_ptr, wsi_ptr, s, K, KA, stride_lp, T,
                          BLOCK_S: tl.constexpr, BLOCK_L: tl.constexpr, CHUNK: tl.constexpr,
                          STEPS_A: tl.constexpr, STEPS_L: tl.constexpr, STEPS_N: tl.constexpr):
    """Token t's top-K as a rule (router._topk_threshold, RULE) and its panels, no pair list.

    In rank space (x rank a, y rank b) the candidates >= theta form a staircase: w(a) of them in
    rank row a (a prefix of its columns, w non-increasing), c(b) in rank column b. Rows a < A and
    columns b < w(A) cover it for any A; A = argmin A + w(A) over A <= R (the lanes' split, where
    the minimum lies: A + w(A) is smallest near w(A) ~ A, and (A+1) w(A) <= K) is the fewest lines.
    Row panel xi[a] (a < A) takes y ranks [0, w(a)) of row a; column panel yi[b] (b < w(A)) takes
    x ranks [A, c(b)) of column b: every candidate >= theta in exactly one panel, the rule
    (rule[t] = theta, e_star) picks the winners among them (ties at theta that lose cost nothing).
    Panel p gets slot pslot[p*T + n] = t, pspan[p*T + n] = rank | first << 10 | end << 20 (n from
    an atomic count; the ranks index the token's sorted axes in the router workspace)."""
    t = tl.program_id(0).to(tl.int64)
    theta, e_star, _n_emit, _n_gt, R, NL, cnt_ge = _topk_threshold(
        t, lp_ptr, lp_ptr + s, wsf_ptr, wsi_ptr, s, K, KA, stride_lp, stride_lp,
        BLOCK_S, BLOCK_L, CHUNK, STEPS_A, STEPS_L, STEPS_N, True)
    _xv, _yv, xi_ptr, yi_ptr, cnt_ptr, _q, _g = _ws_slices(t, wsf_ptr, wsi_ptr, KA)
    lanes = tl.arange(0, BLOCK_L)
    is_row = lanes < R
    tl.store(cnt_ptr + lanes, cnt_ge, mask=lanes < NL)  # over the emit prefix (unused under RULE)
    tl.debug_barrier()
    # w(a) = row lane a's count for a < R; w(R) = the column lanes (b, rows >= R) that reach row R.
    w_r = tl.sum(((lanes >= R) & (lanes < NL) & (cnt_ge > 0)).to(tl.int32), axis=0)
    w = tl.where(is_row, cnt_ge, w_r)
    cost = tl.where(lanes <= R, lanes + w, 1 << 30)
    A = tl.min(tl.where(cost == tl.min(cost, axis=0), lanes, BLOCK_L), axis=0)
    B = tl.sum(tl.where(lanes == A, w, 0), axis=0)
    tt = t.to(tl.int32)
    am = lanes < A  # A <= R < BLOCK_L
    i = tl.load(xi_ptr + lanes, mask=am, other=0)
    pos = tl.atomic_add(pcount_ptr + i, 1, mask=am, sem="relaxed")
    tl.store(pslot_ptr + i.to(tl.int64) * T + pos, tt, mask=am)
    # Spans: rank | first << 10 | end << 20 (_SPAN_BITS; a plain global is not readable here).
    tl.store(pspan_ptr + i.to(tl.int64) * T + pos, lanes | (w << 20), mask=am)
    for b0 in range(0, B, BLOCK_L):
        b = b0 + lanes
        bm = b < B
        # c(b): the row lanes reaching column b (a prefix: their counts do not increase), plus
        # column lane b's rows (>= R).
        lo = tl.zeros_like(b)
        hi = lo + R
        for _ in tl.static_range(STEPS_L):
            mid = (lo + hi) // 2
            reach = tl.load(cnt_ptr + mid, mask=lo < hi, other=0) > b
            lo = tl.where((lo < hi) & reach, mid + 1, lo)
            hi = tl.where((lo < hi) & ~reach, mid, hi)
        c = lo + tl.load(cnt_ptr + R + b, mask=bm & (R + b < NL), other=0)
        p = s + tl.load(yi_ptr + b, mask=bm, other=0)
        pos = tl.atomic_add(pcount_ptr + p, 1, mask=bm, sem="relaxed")
        tl.store(pslot_ptr + p.to(tl.int64) * T + pos, tt, mask=bm)
        tl.store(pspan_ptr + p.to(tl.int64) * T + pos, b | (A << 10) | (c << 20), mask=bm)
    tl.store(rule_ptr + t * 2, theta)
    tl.store(rule_ptr + t * 2 + 1, e_star)


@triton.jit
def _gr_rule_blocks_kernel(pcount_ptr, blkoff_ptr, NP, BM: tl.constexpr, BLOCK: tl.constexpr):
    """One program: blkoff[p] = work items (blocks of BM slots) of the panels before p; blkoff[NP] = all."""
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for p0 in range(0, NP, BLOCK):
        p = p0 + tl.arange(0, BLOCK)
        m = p < NP
        nb = (tl.load(pcount_ptr + p, mask=m, other=0) + BM - 1) // BM
        tl.store(blkoff_ptr + p, carry + tl.cumsum(nb, axis=0) - nb, mask=m)
        carry += tl.sum(nb, axis=0)
    tl.store(blkoff_ptr + NP, carry)


# ----------------------------------------------------------------------------- panel kernel
@triton.jit
def _gr_table_tile(ptr, ebase, estride, width, c, d0, D, dd, dm, BC: tl.constexpr):
    """[BC, BD] tile of an expert table: chunk c of the panel (experts ebase + k * estride, k < width),
    columns d0 + dd of d (zeros outside)."""
    k = c * BC + tl.arange(0, BC)
    rows = (ebase + k * estride).to(tl.int64) * D
    return tl.load(ptr + rows[:, None] + d0 + dd[None, :], mask=(k < width)[:, None] & dm[None, :], other=0.0)


@triton.jit
def _gr_dot(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _gr_rule_scatter(g_base, incl_ptr, wsf_ptr, wsi_ptr, rule_ptr, pslot_ptr, pspan_ptr, slot0, rm, line, is_col, S, KA,
                     GW: tl.constexpr, BM: tl.constexpr, GBLK: tl.constexpr):
    """Gates of a block of rule slots into its zeroed G tile (P = 1: a panel is a whole line).
    Slot m (token t) spans ranks [first, end) along its line's other axis; the token's sorted axes
    (router workspace: xv, yv, xi, yi) give each its log-prob and index. Expert e = i*S + j (i =
    line, j = the index in a row panel; i = the index, j = line in a column panel) wins iff
    key(px[i] + py[j]) > theta, or == theta and e < e_star, the sum the router formed (same fp32
    operands); its gate exp(px[i] + py[j]) as the router computes it. The block's spans are walked
    as one flat list (GBLK per step; a slot by binary search over their inclusive prefix sums in
    incl_ptr, BM int32 of scratch): the work follows the ~25 ranks per span, not the longest.
    A slot's indices are distinct: plain stores. Ends with a barrier."""
    mm = tl.arange(0, BM)
    span = tl.load(pspan_ptr + slot0 + mm, mask=rm, other=0)
    n = tl.where(rm, (span >> 20) - ((span >> 10) & 1023), 0)  # _SPAN_BITS
    tl.store(incl_ptr + mm, tl.cumsum(n, axis=0))
    total = tl.sum(n, axis=0)
    tl.debug_barrier()
    var_off = tl.where(is_col, 0, KA)  # along the line: yv of a row, xv of a column
    gg = tl.arange(0, GBLK)
    for q0 in range(0, total, GBLK):
        q = q0 + gg
        qm = q < total
        m, off = _row_of(q, incl_ptr, BM, BM.bit_length())
        m = tl.where(qm, m, 0)
        t = tl.load(pslot_ptr + slot0 + m, mask=qm, other=0).to(tl.int64)
        sp = tl.load(pspan_ptr + slot0 + m, mask=qm, other=0)
        ws = t * (10 * KA)  # _ws_slices: xv, yv (fp32), xi, yi (int32), 10*KA words per token
        fixed = tl.load(wsf_ptr + ws + tl.where(is_col, KA, 0) + (sp & 1023), mask=qm, other=0.0)  # xv[a] / yv[b]
        r = ws + var_off + ((sp >> 10) & 1023) + off
        score = fixed + tl.load(wsf_ptr + r, mask=qm, other=0.0)
        idx = tl.load(wsi_ptr + r + 2 * KA, mask=qm, other=0)
        key = _f32_key(score)
        theta = tl.load(rule_ptr + t * 2, mask=qm, other=0)
        e_star = tl.load(rule_ptr + t * 2 + 1, mask=qm, other=0)
        e = tl.where(is_col, idx * S + line, line * S + idx)
        win = qm & ((key > theta) | ((key == theta) & (e < e_star)))
        tl.store(g_base + m * GW + idx, tl.exp(score), mask=win)
    tl.debug_barrier()


@triton.jit
def _gr_panel_kernel(
    x_ptr, up_ptr, down_ptr, scol_ptr, sgate_ptr, sslot_ptr, slot_tok_ptr, slot_pair_ptr,
    offsets_ptr, slotoff_ptr, bsums_ptr, bslots_ptr, blkoff_ptr, gscr_ptr, hscr_ptr, y_ptr,
    wsf_ptr, wsi_ptr, rule_ptr, pcount_ptr, pslot_ptr, pspan_ptr,
    D, S, P, PWR, NP, NKEY, T, NSTEPS, KA,
    ACT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, NCH: tl.constexpr, BD: tl.constexpr,
    BD2: tl.constexpr, GBLK: tl.constexpr, SCAN_BLOCK: tl.constexpr, IEEE: tl.constexpr, RULE: tl.constexpr,
):
    """RULE=False: slots and gates from the counting sort of the pair list (launch). RULE=True
    (rule_launch, P = 1): panel p's slots are pslot[p*T : p*T + pcount[p]] and their gates come
    from the router's rule (_gr_rule_scatter); the sorted-pair arguments are not read."""
    GW: tl.constexpr = NCH * BC
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    HT: tl.constexpr = tl.float32 if IEEE else x_ptr.dtype.element_ty
    n_work = tl.load(blkoff_ptr + NP)
    if not RULE:
        n_slots = _gr_start(slotoff_ptr, bslots_ptr, NKEY, SCAN_BLOCK)
        n_pairs = _gr_start(offsets_ptr, bsums_ptr, NKEY, SCAN_BLOCK)
    g_base = gscr_ptr + pid.to(tl.int64) * (BM * GW)
    h_base = hscr_ptr.to(tl.pointer_type(HT)) + pid.to(tl.int64) * (BM * GW)
    mm = tl.arange(0, BM)
    bc = tl.arange(0, BC)
    dd = tl.arange(0, BD)
    dd2 = tl.arange(0, BD2)
    gg = tl.arange(0, GBLK)
    for w in range(pid, n_work, nprog):
        # The panel of work item w: the last p with blkoff[p] <= w (binary search, NSTEPS steps).
        lo = w * 0
        hi = lo + NP
        for _ in range(NSTEPS):
            mid = (lo + hi) // 2
            le = tl.load(blkoff_ptr + mid) <= w
            lo = tl.where(le, mid, lo)
            hi = tl.where(le, hi, mid)
        p = lo
        b = w - tl.load(blkoff_ptr + p)
        # Panel p: row panels (line i, part q) first, then column panels (line j, part q).
        is_col = p >= S * P
        pl = tl.where(is_col, p - S * P, p)
        line = pl // P
        pq = pl - line * P
        ebase = tl.where(is_col, pq * PWR * S + line, line * S + pq * PWR)
        estride = tl.where(is_col, S, 1)
        width = tl.minimum(PWR, S - pq * PWR)
        if RULE:
            slot0 = p * T + b * BM
            rm = (b * BM + mm) < tl.load(pcount_ptr + p)
            tok = tl.load(pslot_ptr + slot0 + mm, mask=rm, other=0).to(tl.int64)
            # G tile: zero it, store the slots' winning gates, then read it back per chunk. The
            # H tile (written after this) holds the scatter's slot prefix sums meanwhile.
            tl.debug_barrier()
            for c in tl.static_range(NCH):
                tl.store(g_base + mm[:, None] * GW + c * BC + bc[None, :], tl.zeros([BM, BC], dtype=tl.float32))
            _gr_rule_scatter(g_base, h_base.to(tl.pointer_type(tl.int32)), wsf_ptr, wsi_ptr, rule_ptr, pslot_ptr,
                             pspan_ptr, slot0, rm, line, is_col, S, KA, GW, BM, GBLK)
        else:
            slot0 = _gr_start(slotoff_ptr, bslots_ptr, p * T, SCAN_BLOCK) + b * BM
            slot1 = tl.minimum(slot0 + BM, _gr_start(slotoff_ptr, bslots_ptr, (p + 1) * T, SCAN_BLOCK))
            rm = (slot0 + mm) < slot1
            tok = tl.load(slot_tok_ptr + slot0 + mm, mask=rm, other=0).to(tl.int64)
            pa = tl.load(slot_pair_ptr + slot0)
            pb = tl.load(slot_pair_ptr + slot1, mask=slot1 < n_slots, other=0)
            pb = tl.where(slot1 < n_slots, pb, n_pairs)
            # G tile: zero it, add the block's gates at (slot, column), then read it back per chunk.
            tl.debug_barrier()
            for c in tl.static_range(NCH):
                tl.store(g_base + mm[:, None] * GW + c * BC + bc[None, :], tl.zeros([BM, BC], dtype=tl.float32))
            tl.debug_barrier()
            for q0 in range(pa, pb, GBLK):
                qm = (q0 + gg) < pb
                sl = tl.load(sslot_ptr + q0 + gg, mask=qm, other=0) - slot0
                col = tl.load(scol_ptr + q0 + gg, mask=qm, other=0)
                gv = tl.load(sgate_ptr + q0 + gg, mask=qm, other=0.0)
                tl.atomic_add(g_base + sl * GW + col, gv, mask=qm, sem="relaxed")
            tl.debug_barrier()
        xrow = tok * D
        # One BC-chunk of S at a time (plain GEMM loops, X re-read per chunk); H = act(S) o G
        # goes to this program's H tile, which the second product reads back chunk by chunk.
        for c in range(0, NCH):
            acc = tl.zeros([BM, BC], dtype=tl.float32)
            for d0 in range(0, D, BD):
                dm = (d0 + dd) < D
                xt = tl.load(x_ptr + xrow[:, None] + d0 + dd[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
                ut = _gr_table_tile(up_ptr, ebase, estride, width, c, d0, D, dd, dm, BC)
                acc = _gr_dot(xt, tl.trans(ut), acc, IEEE)
            # .cg: the gates were written at L2 (atomics, stores); never read a stale L1 line of an earlier block.
            g = tl.load(g_base + mm[:, None] * GW + c * BC + bc[None, :], cache_modifier=".cg")
            tl.store(h_base + mm[:, None] * GW + c * BC + bc[None, :], (_act(acc, ACT) * g).to(HT))
        tl.debug_barrier()
        for d0 in range(0, D, BD2):
            dm = (d0 + dd2) < D
            o = tl.zeros([BM, BD2], dtype=tl.float32)
            for c in range(0, NCH):
                h = tl.load(h_base + mm[:, None] * GW + c * BC + bc[None, :])
                o = _gr_dot(h, _gr_table_tile(down_ptr, ebase, estride, width, c, d0, D, dd2, dm, BC), o, IEEE)
            tl.atomic_add(y_ptr + xrow[:, None] + d0 + dd2[None, :], o, mask=rm[:, None] & dm[None, :], sem="relaxed")


@triton.jit
def _gr_cast_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=m, other=0.0).to(dst_ptr.dtype.element_ty), mask=m)


def panel_config(N: int, fp32: bool, act: int, rule: bool = False) -> dict:
    """Constexprs + num_warps (+ num_stages) of `_gr_panel_kernel` (one place; native plugins too).
    fp32 inputs (IEEE dots, no tensor cores: the exact path, not the fast one) use small tiles
    without software pipelining so that they fit in shared memory. `rule`: slots and gates from
    the router's rule (rule_launch)."""
    _, _, _, nch = panel_geometry(N)
    if rule and not fp32:
        return dict(ACT=act, BM=GR_RULE_BM, BC=GR_BC, NCH=nch, BD=GR_BD, BD2=GR_BD2, GBLK=GR_GATE_BLOCK,
                    SCAN_BLOCK=GR_SCAN_BLOCK, IEEE=False, RULE=True, num_warps=GR_RULE_WARPS,
                    num_stages=GR_RULE_STAGES)
    if fp32:
        return dict(ACT=act, BM=GR_FP32_BM, BC=GR_BC, NCH=nch, BD=32, BD2=64, GBLK=GR_GATE_BLOCK,
                    SCAN_BLOCK=GR_SCAN_BLOCK, IEEE=True, RULE=bool(rule), num_warps=8, num_stages=1)
    return dict(ACT=act, BM=GR_BM, BC=GR_BC, NCH=nch, BD=GR_BD, BD2=GR_BD2, GBLK=GR_GATE_BLOCK,
                SCAN_BLOCK=GR_SCAN_BLOCK, IEEE=False, RULE=bool(rule), num_warps=GR_WARPS,
                num_stages=GR_STAGES)


def panel_steps(N: int) -> int:
    """NSTEPS of `_gr_panel_kernel`: binary-search steps over the 2*s*P panels' work offsets."""
    return max(1, num_panels(N).bit_length())


def line_count_config(N: int, K: int) -> dict:
    """Constexprs + num_warps of `_gr_line_count_kernel` (grid: T, one program per token)."""
    s, P, _, _ = panel_geometry(N)
    nb = triton.next_power_of_2(s * P + 1)
    return dict(NB=nb, CH=max(16, triton.next_power_of_2(min(int(K), GR_LINE_CHUNK))), num_warps=4 if nb <= 2048 else 8)


def histogram_config() -> dict:
    """Constexprs + num_warps of `_gr_histogram_kernel` (grid: cdiv(T*K, BLOCK)); native plugins too."""
    return dict(BLOCK=GR_SORT_BLOCK, num_warps=4)


def scan_blocks_config() -> dict:
    """Constexprs + num_warps of `_gr_scan_blocks_kernel` (grid: cdiv(NP*T + 1, BLOCK))."""
    return dict(BLOCK=GR_SCAN_BLOCK, num_warps=4)


def scatter_config() -> dict:
    """Constexprs + num_warps of `_gr_scatter_kernel` (grid: the histogram's)."""
    return dict(SCAN_BLOCK=GR_SCAN_BLOCK, BLOCK=GR_SORT_BLOCK, num_warps=4)


def blocks_config(N: int, fp32: bool) -> dict:
    """Constexprs + num_warps of `_gr_blocks_kernel` (one program); BM is the panel kernel's."""
    return dict(BM=panel_config(N, fp32, 0)["BM"], SCAN_BLOCK=GR_SCAN_BLOCK, BLOCK=_BLOCKS_BLOCK, num_warps=4)


def cast_config() -> dict:
    """Constexprs + num_warps of `_gr_cast_kernel` (grid: cdiv(T*d, BLOCK); 16-bit outputs only)."""
    return dict(BLOCK=_CAST_BLOCK, num_warps=4)


def _tile_rows() -> int:
    """Rows of the per-program G / H scratch tiles (the larger BM of the two configs)."""
    return max(GR_BM, GR_FP32_BM)


def _rule_tile_rows() -> int:
    """Rows of rule_launch's G / H scratch tiles (its 16-bit and fp32 configs)."""
    return max(GR_RULE_BM, GR_FP32_BM)


def launch(x, up, down, gates, indices, out, workspace, act: int, *, sort_only: bool = False) -> None:
    """Run the grid-row schedule (checked inputs: contiguous, T > 0, `supported(T, K, N)`).
    `sort_only` (benchmarks): stop after the counting sort and work list."""
    from ._launch import Carver

    T, D = x.shape
    N, K = up.shape[0], gates.shape[1]
    fp32 = x.dtype == torch.float32
    cfg = panel_config(N, fp32, act)
    z = _sizes(T, K, N, D, cfg["BM"])
    s, P, pwr, npanels, nkey1, nb, tk = z["s"], z["P"], z["pwr"], z["npanels"], z["nkey1"], z["nb"], z["tk"]
    carver = Carver(workspace, workspace_bytes(T, K, N, D), x.device)
    lcounts = carver.take(nkey1, torch.int32)
    counts = carver.take(nkey1, torch.int32)
    offsets = carver.take(nkey1, torch.int32)
    slotoff = carver.take(nkey1, torch.int32)
    bsums = carver.take(nb, torch.int32)
    bslots = carver.take(nb, torch.int32)
    rank = carver.take(tk, torch.int32)
    scol = carver.take(tk, torch.int32)
    sgate = carver.take(tk, torch.float32)
    sslot = carver.take(tk, torch.int32)
    slot_tok = carver.take(z["nslots"], torch.int32)
    slot_pair = carver.take(z["nslots"], torch.int32)
    blkoff = carver.take(npanels + 1, torch.int32)
    gscr = carver.take(GR_PROGRAMS * _tile_rows() * z["gw"], torch.float32)
    hscr = carver.take(GR_PROGRAMS * _tile_rows() * z["gw"], torch.float32)
    y32 = out if fp32 else carver.take(T * D, torch.float32).view(T, D)
    counts.zero_()
    y32.zero_()
    hist, scatter = histogram_config(), scatter_config()
    sort_grid = (triton.cdiv(tk, hist["BLOCK"]),)
    _gr_line_count_kernel[(T,)](indices, lcounts, K, N, s, P, pwr, T, **line_count_config(N, K))
    _gr_histogram_kernel[sort_grid](indices, lcounts, counts, rank, tk, K, N, s, P, pwr, T, **hist)
    _gr_scan_blocks_kernel[(nb,)](counts, offsets, slotoff, bsums, bslots, nkey1, **scan_blocks_config())
    _scan_top_kernel[(1,)](bsums, nb, BLOCK=_SCAN_TOP_BLOCK)
    _scan_top_kernel[(1,)](bslots, nb, BLOCK=_SCAN_TOP_BLOCK)
    _gr_scatter_kernel[sort_grid](indices, gates, lcounts, rank, offsets, slotoff, bsums, bslots, scol, sgate, sslot,
                                  slot_tok, slot_pair, tk, K, N, s, P, pwr, T, **scatter)
    _gr_blocks_kernel[(1,)](slotoff, bslots, blkoff, npanels, T, **blocks_config(N, fp32))
    if sort_only:
        return
    nsteps = panel_steps(N)
    _gr_panel_kernel[(z["nprog"],)](
        x, up, down, scol, sgate, sslot, slot_tok, slot_pair, offsets, slotoff, bsums, bslots, blkoff, gscr, hscr, y32,
        sgate, scol, scol, counts, scol, scol,  # the rule's arguments: not read (RULE=False)
        D, s, P, pwr, npanels, nkey1 - 1, T, nsteps, 0, **cfg,
    )
    if not fp32:
        _cast(y32, out)


def _cast(y32, out) -> None:
    n = out.numel()
    cast = cast_config()
    _gr_cast_kernel[(triton.cdiv(n, cast["BLOCK"]),)](y32, out, n, **cast)


# ----------------------------------------------------------------------------- from the router's rule
def rule_supported(T: int, K: int, N: int) -> bool:
    """Whether rule_launch takes (T, K, N): the schedule's preconditions, one panel per grid line
    (P = 1: s <= _MAX_CHUNKS * GR_BC) and the threshold router's K (SMALL_K_MAX < K <= 4096)."""
    return (supported(T, K, N) and panel_geometry(N)[1] == 1 and grid_side(N) < (1 << _SPAN_BITS)
            and SMALL_K_MAX < K <= min(4096, N))


def rule_route_config(s: int, K: int) -> dict:
    """Constexprs + num_warps of `_gr_rule_route_kernel`: the threshold router's (same search)."""
    from .router import threshold_kernel_config

    return threshold_kernel_config(s, K)


def rule_workspace_bytes(max_tokens: int, top_k: int, num_experts: int, hidden_size: int) -> int:
    """Scratch of rule_launch (0 where rule_supported never holds)."""
    from ._launch import align
    from .router import topk_workspace_bytes

    if not rule_supported(1, int(top_k), int(num_experts)):
        return 0
    T, N = int(max_tokens), int(num_experts)
    s, npanels = grid_side(N), num_panels(N)
    return (
        align(topk_workspace_bytes(T, s, top_k))  # the router's sorted axes and lane prefixes
        + align(T * 2 * 4)  # rule per token
        + align(npanels * 4) + align(npanels * T * 4) * 2  # slot counts, slots, spans
        + align((npanels + 1) * 4)  # work-item offsets per panel
        + align(GR_RULE_PROGRAMS * _rule_tile_rows() * panel_geometry(N)[3] * GR_BC * 4) * 2  # G and H tiles
        + align(T * int(hidden_size) * 4)  # fp32 accumulator for y
    )


def rule_launch(x, up, down, log_probs, top_k: int, act: int, out, workspace=None) -> None:
    """out [T, d] = the routed experts of the product-key router's top-K (product gates) on
    log_probs [T, 2s] fp32 (px then py, unit stride along s), without a pair list: the rule
    router emits each token's panels, the panel kernel computes their gates from the rule.
    Unchecked (layer inference hot path): x, up, down contiguous of one dtype, T > 0,
    rule_supported(T, top_k, N)."""
    from ._launch import Carver
    from .router import _WS_ROWS

    T, D = x.shape
    N, K = up.shape[0], int(top_k)
    fp32 = x.dtype == torch.float32
    cfg = panel_config(N, fp32, act, rule=True)
    s, _, _, nch = panel_geometry(N)
    npanels = num_panels(N)
    carver = Carver(workspace, rule_workspace_bytes(T, K, N, D), x.device)
    ws = carver.take(T * _WS_ROWS * min(K, s), torch.int32)
    rule = carver.take(T * 2, torch.int32)
    pcount = carver.take(npanels, torch.int32)
    pslot = carver.take(npanels * T, torch.int32)
    pspan = carver.take(npanels * T, torch.int32)
    blkoff = carver.take(npanels + 1, torch.int32)
    gscr = carver.take(GR_RULE_PROGRAMS * _rule_tile_rows() * nch * GR_BC, torch.float32)
    hscr = carver.take(GR_RULE_PROGRAMS * _rule_tile_rows() * nch * GR_BC, torch.float32)
    y32 = out if fp32 else carver.take(T * D, torch.float32).view(T, D)
    pcount.zero_()
    y32.zero_()
    _gr_rule_route_kernel[(T,)](log_probs, rule, pcount, pslot, pspan, ws.view(torch.float32), ws, s, K, min(K, s),
                                log_probs.stride(0), T, **rule_route_config(s, K))
    _gr_rule_blocks_kernel[(1,)](pcount, blkoff, npanels, BM=cfg["BM"], BLOCK=_BLOCKS_BLOCK, num_warps=4)
    nprog = max(1, min(GR_RULE_PROGRAMS, npanels * triton.cdiv(T, cfg["BM"])))
    _gr_panel_kernel[(nprog,)](
        x, up, down, pslot, gscr, pslot, pslot, pslot, pcount, pcount, pcount, pcount, blkoff, gscr, hscr, y32,
        ws.view(torch.float32), ws, rule, pcount, pslot, pspan,  # the pair-list arguments above: not read (RULE=True)
        D, s, 1, s, npanels, 0, T, panel_steps(N), min(K, s), **cfg,
    )
    if not fp32:
        _cast(y32, out)
