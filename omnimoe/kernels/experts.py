"""Routed experts: y[t] = sum_k act(<up[e_tk], x_t>) * g_tk * down[e_tk], two schedules.

token-centric (few tokens per expert: T*K/N small, or decode): one program per token keeps x_t
and y_t in registers and gathers its K expert rows in blocks; no scratch, one launch.

expert-centric (many tokens per expert): a GPU counting sort groups the T*K (token, slot) pairs
by expert (histogram with atomics whose return value is the pair's rank inside its expert,
two-level exclusive scan, scatter; all buffers sized from T*K and N, no host sync). One program
per tile of BE consecutive experts then walks its pairs in blocks of BM: S = X_q @ W_q^T on
tensor cores (W_q = the tile's BE up rows, contiguous), pick each pair's own column, act * gate,
then (one-hot H) @ V_q on tensor cores and fp32 atomic adds into y. A final pass casts y.

hybrid (what "auto" runs at high reuse): the same sort and tile kernel, but the tile kernel only
stores act(<up, x>) * gate per pair (tensor cores, no atomics) and the token-centric kernel then
sums the K down rows per token in registers. On the H200 it beat both others at the paper configs.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .. import ops
from ._launch import MANY_TOKENS, Carver, check_device, check_out, next_pow2

ACT_IDS = {"silu": 0, "gelu": 1, "relu": 2, "gelu_tanh": 3}

# Expert-centric tiles: BE consecutive experts x BM pairs x BD hidden features per step.
_EC_BE = 16
_EC_BM = 64
_EC_BD = 64
# Scan block for the counting sort's exclusive scan over N+1 counters.
_SCAN_BLOCK = 1024
# Expected pairs per expert (T*K/N) from which the expert-centric schedule wins; below it, or for
# few tokens, the token-centric one. Measured on the H200 (experts_only in benchmarks/h200.json):
# readme (16 per expert) token 0.09 ms vs hybrid 0.33 ms; paper_min (20) token 2.51 ms,
# atomic expert 3.24 ms, hybrid 2.35 ms.
EXPERT_CENTRIC_MIN_REUSE = 20.0
EXPERT_CENTRIC_MIN_TOKENS = 65
# Which expert-centric variant "auto" runs (both are tested; hybrid measured faster on the H200).
EXPERT_CENTRIC_SCHEDULE = "hybrid"


@triton.jit
def _exp_ftz(v):
    # One MUFU.EX2 without the range fix-ups ptxas adds around non-ftz ex2 (denormals flush to 0).
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [v * 1.4426950408889634],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _rcp_ftz(v):
    # One MUFU.RCP (1 ulp) instead of div.full's fix-ups; 1 / inf = 0 as in the division.
    return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _act(h, ACT: tl.constexpr, FAST: tl.constexpr = False):
    """act(h) in fp32. FAST (GPU only, not the interpreter: inline PTX): silu and gelu_tanh with
    two bare special-function ops per element instead of ~11 instructions; element-wise passes
    over [T, N] are bound by them (dense_rule.py)."""
    if ACT == 0:  # silu
        if FAST:
            return h * _rcp_ftz(1.0 + _exp_ftz(-h))
        return h / (1.0 + tl.exp(-h))
    elif ACT == 1:  # gelu (erf)
        return 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:  # relu
        return tl.maximum(h, 0.0)
    else:  # gelu_tanh; tanh(u) = 1 - 2 / (1 + exp(2u)) saturates correctly at +-inf
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        if FAST:
            return 0.5 * h * (2.0 - 2.0 * _rcp_ftz(1.0 + _exp_ftz(2.0 * u)))
        return 0.5 * h * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))


# ----------------------------------------------------------------------------- token-centric
@triton.jit
def _token_centric_kernel(
    x_ptr, up_ptr, down_ptr, g_ptr, idx_ptr, y_ptr,
    D, K, N,
    ACT: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, H_GIVEN: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dm = dd < D
    if not H_GIVEN:
        xr = tl.load(x_ptr + t * D + dd, mask=dm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        km = (k0 + kk) < K
        e = tl.load(idx_ptr + t * K + k0 + kk, mask=km, other=0)
        # Out-of-range ids (corrupt input) contribute nothing instead of reading out of bounds.
        km = km & (e >= 0) & (e < N)
        g = tl.load(g_ptr + t * K + k0 + kk, mask=km, other=0.0)
        rows = e.to(tl.int64) * D
        m2 = km[:, None] & dm[None, :]
        if H_GIVEN:
            # g_ptr holds act(<up, x>) * gate per pair already (expert-centric first stage).
            h = g
            v = tl.load(down_ptr + rows[:, None] + dd[None, :], mask=m2, other=0.0).to(tl.float32)
        else:
            # Both gathers are issued before any math so the two rows' latencies overlap.
            u = tl.load(up_ptr + rows[:, None] + dd[None, :], mask=m2, other=0.0)
            v = tl.load(down_ptr + rows[:, None] + dd[None, :], mask=m2, other=0.0)
            h = _act(tl.sum(u.to(tl.float32) * xr[None, :], axis=1), ACT) * g
            v = v.to(tl.float32)
        acc += tl.sum(h[:, None] * v, axis=0)
    tl.store(y_ptr + t * D + dd, acc.to(y_ptr.dtype.element_ty), mask=dm)


# ----------------------------------------------------------------------------- counting sort
@triton.jit
def _histogram_kernel(idx_ptr, counts_ptr, rank_ptr, TK, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < TK
    e = tl.load(idx_ptr + offs, mask=m, other=0)
    valid = m & (e >= 0) & (e < N)
    # The old value is this pair's slot inside its expert's group.
    r = tl.atomic_add(counts_ptr + e, 1, mask=valid, sem="relaxed")
    tl.store(rank_ptr + offs, r, mask=m)


@triton.jit
def _scan_blocks_kernel(counts_ptr, offsets_ptr, block_sums_ptr, N1, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < N1
    c = tl.load(counts_ptr + offs, mask=m, other=0)
    tl.store(offsets_ptr + offs, tl.cumsum(c, axis=0) - c, mask=m)
    tl.store(block_sums_ptr + pid, tl.sum(c, axis=0))


@triton.jit
def _scan_top_kernel(block_sums_ptr, NB, BLOCK: tl.constexpr):
    # In-place exclusive scan of the per-block totals (one program; NB = (N+1)/1024 is small).
    carry = tl.sum(tl.zeros([BLOCK], dtype=tl.int32), axis=0)
    for b0 in range(0, NB, BLOCK):
        offs = b0 + tl.arange(0, BLOCK)
        m = offs < NB
        v = tl.load(block_sums_ptr + offs, mask=m, other=0)
        tl.store(block_sums_ptr + offs, carry + tl.cumsum(v, axis=0) - v, mask=m)
        carry += tl.sum(v, axis=0)


@triton.jit
def _group_start(offsets_ptr, block_sums_ptr, e, SCAN_BLOCK: tl.constexpr):
    return tl.load(offsets_ptr + e) + tl.load(block_sums_ptr + e // SCAN_BLOCK)


@triton.jit
def _scatter_kernel(idx_ptr, rank_ptr, offsets_ptr, block_sums_ptr, sorted_ptr, TK, N,
                    SCAN_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < TK
    e = tl.load(idx_ptr + offs, mask=m, other=0)
    m = m & (e >= 0) & (e < N)
    e = tl.where(m, e, 0)
    pos = tl.load(offsets_ptr + e, mask=m, other=0) + tl.load(block_sums_ptr + e // SCAN_BLOCK, mask=m, other=0)
    pos += tl.load(rank_ptr + offs, mask=m, other=0)
    tl.store(sorted_ptr + pos, offs, mask=m)


# ----------------------------------------------------------------------------- expert tiles
@triton.jit
def _expert_tile_kernel(
    x_ptr, up_ptr, down_ptr, g_ptr, idx_ptr, sorted_ptr, offsets_ptr, block_sums_ptr, y_ptr,
    D, K, N,
    ACT: tl.constexpr, BE: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr,
    SCAN_BLOCK: tl.constexpr, IEEE: tl.constexpr, SPLIT: tl.constexpr, STORE_H: tl.constexpr,
):
    e0 = tl.program_id(0) * BE
    start = _group_start(offsets_ptr, block_sums_ptr, e0, SCAN_BLOCK)
    end = _group_start(offsets_ptr, block_sums_ptr, tl.minimum(e0 + BE, N), SCAN_BLOCK)
    cols = tl.arange(0, BE)
    erows = e0 + cols
    em = erows < N
    wrow = erows.to(tl.int64) * D
    dd = tl.arange(0, BD)
    mm = tl.arange(0, BM)
    for m0 in range(start, end, BM):
        rm = (m0 + mm) < end
        p = tl.load(sorted_ptr + m0 + mm, mask=rm, other=0)
        tok = (p // K).to(tl.int64)
        e = tl.load(idx_ptr + p, mask=rm, other=0)
        g = tl.load(g_ptr + p, mask=rm, other=0.0)
        xrow = tok * D
        # S[m, c] = <x[tok_m], up[e0 + c]> for the whole tile; each pair keeps its own column.
        acc = tl.zeros([BM, BE], dtype=tl.float32)
        for d0 in range(0, D, BD):
            dm = (d0 + dd) < D
            xt = tl.load(x_ptr + xrow[:, None] + d0 + dd[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
            w = tl.load(up_ptr + wrow[:, None] + d0 + dd[None, :], mask=em[:, None] & dm[None, :], other=0.0)
            if IEEE:
                acc = tl.dot(xt, tl.trans(w), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt, tl.trans(w), acc)
        onehot = (e - e0)[:, None] == cols[None, :]
        h = _act(tl.sum(tl.where(onehot, acc, 0.0), axis=1), ACT) * g
        if STORE_H:
            # Hybrid schedule: y_ptr is the [T*K] fp32 buffer of act(<up, x>) * gate per pair.
            tl.store(y_ptr + p, h, mask=rm)
        else:
            hm = tl.where(onehot, h[:, None], 0.0)
            if SPLIT:
                # 16-bit tensor-core operands: split h into hi + lo parts to keep ~16 mantissa bits.
                h_hi = hm.to(x_ptr.dtype.element_ty)
                h_lo = (hm - h_hi.to(tl.float32)).to(x_ptr.dtype.element_ty)
            for d0 in range(0, D, BD):
                dm = (d0 + dd) < D
                v = tl.load(down_ptr + wrow[:, None] + d0 + dd[None, :], mask=em[:, None] & dm[None, :], other=0.0)
                if SPLIT:
                    o = tl.dot(h_hi, v)
                    o = tl.dot(h_lo, v, o)
                elif IEEE:
                    o = tl.dot(hm, v.to(tl.float32), input_precision="ieee")
                else:
                    o = tl.dot(hm, v.to(tl.float32))
                tl.atomic_add(y_ptr + xrow[:, None] + d0 + dd[None, :], o, mask=rm[:, None] & dm[None, :], sem="relaxed")


def expert_workspace_bytes(max_tokens: int, top_k: int, num_experts: int, hidden_size: int) -> int:
    """Scratch for the expert-centric schedules (the token-centric one needs none): the larger of
    the sorted-pairs schedules' and, where `use_grid_row` may pick it for some T <= max_tokens,
    the grid-row schedule's (both carve the same workspace from its start)."""
    from . import grid_row

    pairs = pairs_workspace_bytes(max_tokens, top_k, num_experts, hidden_size)
    t_grid = _grid_row_max_tokens(int(max_tokens), int(top_k), int(num_experts))
    if not t_grid:
        return pairs
    return max(pairs, grid_row.workspace_bytes(t_grid, top_k, num_experts, hidden_size))


def pairs_workspace_bytes(max_tokens: int, top_k: int, num_experts: int, hidden_size: int) -> int:
    """Scratch of the sorted-pairs schedules (expert, hybrid) alone: what the native C++ plugins,
    which run the hybrid only, allocate."""
    from ._launch import align

    tk = int(max_tokens) * int(top_k)
    n1 = int(num_experts) + 1
    nb = (n1 + _SCAN_BLOCK - 1) // _SCAN_BLOCK
    return (
        align(n1 * 4) * 2  # counts, offsets
        + align(nb * 4)  # block sums
        + align(tk * 4) * 2  # rank, sorted pairs
        + align(int(max_tokens) * int(hidden_size) * 4)  # fp32 accumulator for y
    )


# Grid-line schedule (grid_row.py) for perfect-square N: "auto" runs it instead of the hybrid from
# GRID_ROW_MIN_TOKENS tokens and EXPERT_CENTRIC_MIN_REUSE pairs per expert on (OmniMoELayer still
# runs the dense GEMMs from DENSE_MIN_DENSITY; the TensorRT plugins have no dense). Measured on the H200
# (scripts/bench_layer.py's experts_only, benchmarks/h200.json: T=4096, d=1024, N=102400, bf16, the
# layer's routing): grid 1.03 / 2.14 / 3.40 ms at K = 512 / 2048 / 4096 against dense 2.44 / 2.81 / 3.41
# and hybrid 2.35 / 9.31 / 18.5 (the grid's cost grows with the panels per token, dense's does not).
GRID_ROW_MIN_TOKENS = 256


def _grid_row_max_tokens(max_tokens: int, K: int, N: int) -> int:
    """The largest T <= max_tokens for which use_grid_row holds, or 0 (its conditions hold from
    some T on, up to the schedule's int32 limit)."""
    from . import grid_row

    t = min(max_tokens, grid_row.max_tokens(K, N))
    return t if t > 0 and use_grid_row(t, K, N) else 0


def use_grid_row(T: int, K: int, N: int) -> bool:
    """Grid-row schedule ("auto" of expert_grouped_matmul_triton) when N = s*s and there are enough
    tokens and pairs per expert."""
    from . import grid_row

    return T >= GRID_ROW_MIN_TOKENS and T * K >= EXPERT_CENTRIC_MIN_REUSE * N and grid_row.supported(T, K, N)


def use_expert_centric(T: int, K: int, N: int) -> bool:
    """Expert-centric (sorted pairs, or grid rows: `use_grid_row` implies this) when each expert
    expects enough tokens to amortise grouping."""
    return T >= EXPERT_CENTRIC_MIN_TOKENS and T * K >= EXPERT_CENTRIC_MIN_REUSE * N


# Block of the counting sort's histogram and scatter kernels (pairs per program).
_SORT_BLOCK = 1024
# Block of the single-program scan over the per-block totals.
_SCAN_TOP_BLOCK = 1024


def token_centric_config(hidden_size: int, top_k: int, act: int, h_given: bool, many_tokens: bool = False) -> dict:
    """Constexprs + num_warps of `_token_centric_kernel` (one place; the native plugins compile it).
    `many_tokens` (at least _launch.MANY_TOKENS per launch): 4 warps and [BLOCK_K, BLOCK_D] tiles of
    4096 elements, more programs resident per SM (H200, d=1024, K=16, T=4096, N = 64^2 / 256^2 /
    1024^2: 4 rows per step took 37 / 64 / 72 us against 82 / 101 / 110 with 16 rows and 8 warps;
    scripts/sweep_small_k.py).
    Fewer tokens keep all rows in flight at once: one token's latency (decode)."""
    block_d = next_pow2(int(hidden_size))
    tile, warps = (4096, 4) if many_tokens else (16384, 4 if block_d <= 512 else 8)  # [BLOCK_K, BLOCK_D] elements
    block_k = max(2, min(next_pow2(int(top_k)), tile // block_d))
    return dict(ACT=act, BLOCK_D=block_d, BLOCK_K=block_k, H_GIVEN=h_given, num_warps=warps)


def expert_tile_config(fp32: bool, act: int, store_h: bool) -> dict:
    """Constexprs + num_warps of `_expert_tile_kernel` (one place; the native plugins compile it)."""
    return dict(ACT=act, BE=_EC_BE, BM=_EC_BM, BD=_EC_BD, SCAN_BLOCK=_SCAN_BLOCK,
                IEEE=fp32, SPLIT=not fp32, STORE_H=store_h, num_warps=4)


_token_centric_config_cached = functools.lru_cache(maxsize=64)(token_centric_config)


def token_centric_fast(x, up, down, gates, indices, out, act: int) -> None:
    """Unchecked token-centric launch (layer inference hot path; same kernel and launch config as
    `_launch_token_centric`). Caller guarantees the contract `expert_grouped_matmul_triton`
    checks: contiguous tensors, matching shapes and dtypes, T > 0."""
    D, K, N = x.shape[1], gates.shape[1], up.shape[0]
    _token_centric_kernel[(x.shape[0],)](x, up, down, gates, indices, out, D, K, N,
                                         **_token_centric_config_cached(D, K, act, False, x.shape[0] >= MANY_TOKENS))


def _launch_token_centric(x, up, down, g, indices, out, D, K, N, act, h_given):
    _token_centric_kernel[(x.shape[0],)](
        x, up, down, g, indices, out, D, K, N, **token_centric_config(D, K, act, h_given, x.shape[0] >= MANY_TOKENS)
    )


def _check_expert_call(x, up, down, gates, indices, activation) -> tuple[int, int, int, int]:
    """(T, d, N, K) after the op contract's checks plus what the Triton launchers need."""
    T, D, N, K = ops.check_expert_inputs(x, up, down, gates, indices, activation)
    check_device(x, up, down, gates, indices)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or up.dtype != x.dtype or down.dtype != x.dtype:
        raise ops.OmniMoEInputError(f"x, up, down must share one of fp32/fp16/bf16, got {x.dtype}/{up.dtype}/{down.dtype}")
    return T, D, N, K


def expert_grouped_matmul_triton(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    indices: torch.Tensor,
    activation: str,
    *,
    out: torch.Tensor | None = None,
    workspace: torch.Tensor | None = None,
    schedule: str = "auto",
) -> torch.Tensor:
    """y [T,d] in x's dtype (ops.expert_grouped_matmul_reference).

    `schedule`: auto | token | expert (tile kernel accumulates y with fp32 atomics) | hybrid
    (tile kernel computes act(<up, x>) * gate per pair on tensor cores, then a token-centric pass
    sums the down rows without atomics) | grid (grid_row.py: whole product-key grid rows and
    columns times the tokens that use them; N must be a perfect square).

    With out and workspace given: no allocation, no host sync, current stream only.
    """
    T, D, N, K = _check_expert_call(x, up, down, gates, indices, activation)
    for name, t in (("x", x), ("up", up), ("down", down), ("gates", gates), ("indices", indices)):
        if not t.is_contiguous():
            raise ops.OmniMoEInputError(f"{name} must be contiguous")
    dev = x.device
    if out is None:
        out = torch.empty((T, D), dtype=x.dtype, device=dev)
    check_out(out, (T, D), x.dtype, dev, "out")
    if T == 0:
        return out
    act = ACT_IDS[activation]
    from . import grid_row  # imports this module: not at the top

    if schedule == "auto":
        if use_grid_row(T, K, N) and grid_row.fits_device(dev):
            schedule = "grid"
        else:
            schedule = EXPERT_CENTRIC_SCHEDULE if use_expert_centric(T, K, N) else "token"
    if schedule == "token":
        _launch_token_centric(x, up, down, gates, indices, out, D, K, N, act, h_given=False)
        return out
    if schedule == "grid":
        if not grid_row.supported(T, K, N):
            raise ops.OmniMoEInputError(f"schedule 'grid' needs a perfect-square N (and int32-sized keys), got N={N}")
        if not grid_row.fits_device(dev):
            raise ops.OmniMoEInputError(f"schedule 'grid' needs {grid_row.GR_MIN_SHARED_BYTES // 1024} KiB of shared "
                                        "memory per block, more than this GPU has")
        grid_row.launch(x, up, down, gates, indices, out, workspace, act)
        return out
    if schedule not in ("expert", "hybrid"):
        raise ops.OmniMoEInputError(f"schedule must be auto|token|expert|hybrid|grid, got {schedule!r}")

    tk, n1 = T * K, N + 1
    nb = triton.cdiv(n1, _SCAN_BLOCK)
    carver = Carver(workspace, expert_workspace_bytes(T, K, N, D), dev)
    counts = carver.take(n1, torch.int32)
    offsets = carver.take(n1, torch.int32)
    block_sums = carver.take(nb, torch.int32)
    rank = carver.take(tk, torch.int32)
    sorted_pairs = carver.take(tk, torch.int32)
    counts.zero_()
    blk = _SORT_BLOCK
    _histogram_kernel[(triton.cdiv(tk, blk),)](indices, counts, rank, tk, N, BLOCK=blk)
    _scan_blocks_kernel[(nb,)](counts, offsets, block_sums, n1, BLOCK=_SCAN_BLOCK)
    _scan_top_kernel[(1,)](block_sums, nb, BLOCK=_SCAN_TOP_BLOCK)
    _scatter_kernel[(triton.cdiv(tk, blk),)](indices, rank, offsets, block_sums, sorted_pairs, tk, N,
                                            SCAN_BLOCK=_SCAN_BLOCK, BLOCK=blk)
    fp32 = x.dtype == torch.float32
    hybrid = schedule == "hybrid"
    if hybrid:
        # rank is dead after the scatter: reuse it for the per-pair act(<up, x>) * gate.
        target = rank.view(torch.float32)
    else:
        target = out if fp32 else carver.take(T * D, torch.float32).view(T, D)
        target.zero_()
    _expert_tile_kernel[(triton.cdiv(N, _EC_BE),)](
        x, up, down, gates, indices, sorted_pairs, offsets, block_sums, target, D, K, N,
        **expert_tile_config(fp32, act, hybrid),
    )
    if hybrid:
        _launch_token_centric(x, up, down, target, indices, out, D, K, N, act, h_given=True)
    elif target is not out:
        out.copy_(target)
    return out


# ----------------------------------------------------------------------------- dense (high density)
# Dense formulation for high routing density (K/N): Y = (act(X Up^T) o G) Down with G the routed
# gates scattered into [T, N]. Two tensor-core GEMMs (cuBLAS, 4*T*N*d FLOPs whatever K is) and one
# Triton pass over the T*K pairs, instead of moving one up and one down row per (token, expert)
# pair (2*T*K*d elements). S = X Up^T is rounded to x's dtype by the GEMM (as a bf16 PEER-style
# layer rounds it); act(S) * g is computed in fp32 and rounded to x's dtype for the second GEMM.
# Token chunks keep each [t, N] buffer (S and H) at most this many elements.
_DENSE_CHUNK_ELEMENTS = 1 << 29
# OmniMoELayer's inference takes the dense schedule from this density K/N and token count on.
# 1/32: dense's cost hardly depends on K, the grid-line one's grows with K (H200, N=102400, T=4096,
# experts_only in benchmarks/h200.json: K=2048 grid 2.14 ms vs dense 2.81; K=4096 a tie, 3.40 vs 3.41,
# and the layer keeps the dense GEMMs there).
DENSE_MIN_DENSITY = 1.0 / 32
DENSE_MIN_TOKENS = 256


def use_dense(T: int, K: int, N: int) -> bool:
    """Dense schedule (layer inference) when the routed pairs fill at least DENSE_MIN_DENSITY of
    the [T, N] grid and T is large enough for the GEMMs to fill the GPU."""
    return T >= DENSE_MIN_TOKENS and K >= DENSE_MIN_DENSITY * N


@triton.jit
def _dense_pairs_kernel(s_ptr, g_ptr, idx_ptr, h_ptr, N, K, ACT: tl.constexpr, BLOCK_K: tl.constexpr):
    """H[t, e] = act(S[t, e]) * g for each of token t's pairs (H zeroed before; ids distinct per
    token, as the router emits them; out-of-range ids are skipped)."""
    t = tl.program_id(0).to(tl.int64)
    kk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    km = kk < K
    e = tl.load(idx_ptr + t * K + kk, mask=km, other=0)
    km = km & (e >= 0) & (e < N)
    g = tl.load(g_ptr + t * K + kk, mask=km, other=0.0)
    sv = tl.load(s_ptr + t * N + e, mask=km, other=0.0).to(tl.float32)
    tl.store(h_ptr + t * N + e, (_act(sv, ACT) * g).to(h_ptr.dtype.element_ty), mask=km)


def expert_dense_matmul(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    indices: torch.Tensor,
    activation: str,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [T,d] = (act(x up^T) o G) down, G[t, indices[t,k]] = gates[t,k]: the routed experts as two
    dense GEMMs (ops.expert_grouped_matmul_reference when each token's ids are distinct, which
    the product-key router guarantees; a repeated id counts once here, twice there).

    Cost does not depend on K: 4*T*N*d FLOPs on tensor cores plus [T, N] scratch traffic, so it
    wins over the gathering schedules at high density K/N (see OmniMoELayer). Not a TensorRT
    plugin schedule (cuBLAS GEMMs); allocates [t, N] scratch per token chunk."""
    T, D, N, K = _check_expert_call(x, up, down, gates, indices, activation)
    if out is None:
        out = torch.empty((T, D), dtype=x.dtype, device=x.device)
    check_out(out, (T, D), x.dtype, x.device, "out")
    _dense_launch(x.contiguous(), up, down, gates.contiguous(), indices.contiguous(), ACT_IDS[activation], out)
    return out


def dense_two_gemms(x, up, down, out, hidden) -> None:
    """out [T, d] = H down with H = hidden(S, t0, t1) from S = x[t0:t1] up^T, token chunk by token
    chunk (each [t, N] buffer at most _DENSE_CHUNK_ELEMENTS); `hidden` may return S rewritten in
    place. The dense schedules' one driver: from the pair list here, from the rule in dense_rule."""
    T, N = x.shape[0], up.shape[0]
    rows = max(1, min(T, _DENSE_CHUNK_ELEMENTS // N))
    for t0 in range(0, T, rows):
        t1 = min(T, t0 + rows)
        s = torch.mm(x[t0:t1], up.t())
        h = hidden(s, t0, t1)
        del s  # a separate H: S's memory goes back before the second GEMM
        torch.mm(h, down, out=out[t0:t1])


def _dense_launch(x, up, down, gates, indices, act: int, out) -> None:
    """Unchecked dense schedule (layer inference path): x, gates, indices contiguous, out [T, d]."""
    N, K = up.shape[0], gates.shape[1]
    block_k = min(1024, max(16, next_pow2(K)))

    def from_pairs(s, t0, t1):
        h = torch.zeros_like(s)
        _dense_pairs_kernel[(t1 - t0, triton.cdiv(K, block_k))](
            s, gates[t0:t1], indices[t0:t1], h, N, K, ACT=act, BLOCK_K=block_k, num_warps=4,
        )
        return h

    dense_two_gemms(x, up, down, out, from_pairs)
