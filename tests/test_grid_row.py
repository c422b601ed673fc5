"""Grid-row ("panel") expert schedule (omnimoe/kernels/grid_row.py) vs the reference op.

CPU: the cases run under TRITON_INTERPRET=1 in one subprocess (as tests/test_kernels.py does), in
fp32 and fp16 (the interpreter's bf16 arithmetic is not faithful), with the tile constants shrunk
so that tiny shapes still cover several panels per grid row, several chunks per panel, several
blocks per panel with a ragged last block, and persistent programs that each run several work
items (their G / H scratch tiles reused). Ids include duplicates (they add) and out-of-range
values (they contribute nothing). `test_mutations` shows the checks fail on a wrong kernel.
GPU (`-m gpu`): real sizes, bf16 vs PEER-style arithmetic, fp32, graph capture, no allocation.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from interpreter import interpret, report, run_cases  # noqa: E402
from omnimoe import ops  # noqa: E402
from omnimoe.errors import OmniMoEInputError  # noqa: E402


def rel_err(y, yr):
    return float((y.double() - yr.double()).norm() / yr.double().norm().clamp_min(1e-30))


def _inputs(T, d, N, K, seed, dtype=torch.float32, device="cpu", bad_ids=True, ids="uniform"):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen)
    up = torch.randn(N, d, generator=gen) * d**-0.5
    down = torch.randn(N, d, generator=gen) * d**-0.5
    g = torch.rand(T, K, generator=gen)
    idx = torch.randint(0, N, (T, K), generator=gen)
    s = int(round(N**0.5))
    if ids == "columns":
        # Two thirds of each token's pairs in one grid column (distinct rows): column panels.
        n = min(2 * K // 3, s)
        col = torch.randint(0, s, (T, 1), generator=gen)
        rows = torch.argsort(torch.rand(T, s, generator=gen), dim=1)[:, :n]
        idx[:, K - n:] = rows * s + col
    elif ids == "product":
        # Product-key routing: each token's staircase of top rows and top columns (both panel kinds).
        px = torch.log_softmax(torch.randn(T, s, generator=gen), -1)
        py = torch.log_softmax(torch.randn(T, s, generator=gen), -1)
        g, idx = ops.product_key_topk_reference(px, py, K, "product")
    if bad_ids and K >= 3 and T >= 3:
        idx[:, 1] = idx[:, 0]  # duplicates in every token: their terms add
        idx[0, 2] = N  # out of range: nothing
        idx[T - 1, 2] = -7
    idx = idx.to(torch.int32)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return cast(x), cast(up), cast(down), g.to(device), idx.to(device)


def _reference(x, up, down, g, idx, act):
    N = up.shape[0]
    ok = (idx >= 0) & (idx < N)
    return ops.expert_grouped_matmul_reference(x.float(), up.float(), down.float(), g * ok, torch.where(ok, idx, 0), act)


@contextlib.contextmanager
def _consts(**kw):
    from omnimoe.kernels import grid_row as gr

    saved = {k: getattr(gr, k) for k in kw}
    for k, v in kw.items():
        setattr(gr, k, v)
    try:
        yield gr
    finally:
        for k, v in saved.items():
            setattr(gr, k, v)


# Small tiles for the interpreter: BC=16 experts per chunk, at most 2 chunks (32 columns) per panel.
SMALL = dict(GR_BC=16, _MAX_CHUNKS=2, GR_BM=16, GR_FP32_BM=16, GR_PROGRAMS=3, GR_GATE_BLOCK=32, GR_SORT_BLOCK=64,
             GR_SCAN_BLOCK=64, GR_RULE_BM=16, GR_RULE_PROGRAMS=3)


def _grid_case(T, d, N, K, act="silu", dtype=torch.float32, prealloc=True, seed=0, consts=SMALL, auto=False,
               ids="uniform"):
    """The grid schedule against the reference."""
    from omnimoe.kernels import expert_workspace_bytes
    from omnimoe.kernels.experts import expert_grouped_matmul_triton

    with _consts(**consts) as gr:
        x, up, down, g, idx = _inputs(T, d, N, K, seed, dtype, ids=ids)
        kw = {}
        if prealloc:
            # "auto" sizes from expert_workspace_bytes; an explicit "grid" needs the schedule's own size.
            need = expert_workspace_bytes(T, K, N, d) if auto else gr.workspace_bytes(T, K, N, d)
            kw = dict(out=torch.full((T, d), float("nan"), dtype=dtype),
                      workspace=torch.full((need,), 255, dtype=torch.uint8))
        if auto:
            from omnimoe.kernels.experts import use_grid_row

            assert use_grid_row(T, K, N)
        y = expert_grouped_matmul_triton(x, up, down, g, idx, act, schedule="auto" if auto else "grid", **kw)
        if prealloc:
            assert y.data_ptr() == kw["out"].data_ptr()
        yr = _reference(x, up, down, g, idx, act)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert torch.isfinite(y).all() and rel_err(y, yr) <= tol, rel_err(y, yr)
        return gr.panel_geometry(N)


def _geometry_case():
    with _consts(**SMALL) as gr:
        assert gr.panel_geometry(81 * 81) == (81, 3, 27, 2)  # 3 panels of 27 columns, 2 chunks each
        assert gr.panel_geometry(30 * 30) == (30, 1, 30, 2)
        assert gr.grid_side(80) is None and not gr.supported(10, 3, 80) and gr.workspace_bytes(10, 3, 80, 8) == 0
    from omnimoe.kernels import grid_row as gr

    assert gr.panel_geometry(102400) == (320, 1, 320, 5)  # the paper configs: one panel per grid row
    assert gr.panel_geometry(1 << 20) == (1024, 4, 256, 4)


def _line_counts_case():
    """The line-count kernel's per-token row- and column-panel histograms (what decides each pair's
    panel; a wrong count would only cost speed, so it is checked exactly here), from a garbage
    workspace, with duplicate and out-of-range ids."""
    with _consts(**SMALL) as gr:
        T, d, N, K = 23, 8, 81 * 81, 50
        x, up, down, g, idx = _inputs(T, d, N, K, 12, ids="product")
        s, P, pwr, _ = gr.panel_geometry(N)
        ws = torch.full((gr.workspace_bytes(T, K, N, d),), 255, dtype=torch.uint8)
        gr.launch(x, up, down, g, idx, torch.empty(T, d), ws, 0, sort_only=True)
        got = ws[: 2 * s * P * T * 4].view(torch.int32).view(T, 2 * s * P)  # token-major
        e = idx.long()
        ok = (e >= 0) & (e < N)
        i, j = torch.where(ok, e, 0) // s, torch.where(ok, e, 0) % s
        want = torch.zeros(T, 2 * s * P, dtype=torch.int32)
        want.scatter_add_(1, i * P + j // pwr, ok.int()).scatter_add_(1, s * P + j * P + i // pwr, ok.int())
        assert torch.equal(got, want)


def _bad_inputs_case():
    from omnimoe.kernels.experts import expert_grouped_matmul_triton

    x, up, down, g, idx = _inputs(4, 8, 12, 3, 0)
    with pytest.raises(OmniMoEInputError):  # N = 12 is no square: no product-key grid
        expert_grouped_matmul_triton(x, up, down, g, idx, "silu", schedule="grid")
    with pytest.raises(OmniMoEInputError):
        expert_grouped_matmul_triton(x, up, down, g, idx, "silu", schedule="rows")
    x, up, down, g, idx = _inputs(4, 8, 16, 3, 0)
    with pytest.raises(OmniMoEInputError):  # too small a workspace
        expert_grouped_matmul_triton(x, up, down, g, idx, "silu", schedule="grid", workspace=torch.empty(64, dtype=torch.uint8))


def _rule_logprobs(T, s, seed, kind):
    """[T, 2s] fp32 log-probs (px then py): "random" (no ties), "bf16" (bf16-rounded logits, as the
    benchmark's router gives: ties at theta), "coarse" (logits in steps of 1/4: many ties, the
    tie bisection over expert ids decides)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, 2, s, generator=gen)
    if kind == "bf16":
        logits = logits.bfloat16().float()
    elif kind == "coarse":
        logits = (logits * 4).round() / 4
    return torch.log_softmax(logits, -1).reshape(T, 2 * s).contiguous()


def _rule_case(T, d, s, K, act="silu", dtype=torch.float32, seed=0, kind="random", consts=SMALL, prealloc=True):
    """grid_row.rule_launch (slots and gates from the router's rule) against the reference router
    and op on the same log-probs."""
    with _consts(**consts) as gr:
        N = s * s
        assert gr.rule_supported(T, K, N)
        x, up, down, _, _ = _inputs(T, d, N, 3, seed, dtype, bad_ids=False)
        lp = _rule_logprobs(T, s, seed, kind)
        g, idx = ops.product_key_topk_reference(lp[:, :s], lp[:, s:], K, "product")
        out = torch.full((T, d), float("nan"), dtype=dtype)
        ws = torch.full((gr.rule_workspace_bytes(T, K, N, d),), 255, dtype=torch.uint8) if prealloc else None
        from omnimoe.kernels.experts import ACT_IDS

        gr.rule_launch(x, up, down, lp, K, ACT_IDS[act], out, ws)
        yr = _reference(x, up, down, g, idx, act)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        assert torch.isfinite(out).all() and rel_err(out, yr) <= tol, rel_err(out, yr)


def _rule_panels_case():
    """The rule router's panels, exactly: token t in rows (x ranks) a < A and columns (y ranks)
    b < B(A) = 1 + the largest y rank of a winner in x ranks >= A, A = argmin A + B(A) over
    A <= min(s, isqrt(K)) (smallest on ties); no ties in these log-probs, so the candidates >= theta
    are the winners."""
    import math

    from omnimoe.kernels._launch import align
    from omnimoe.kernels.router import _WS_ROWS

    with _consts(**SMALL) as gr:
        T, d, s, K = 29, 8, 30, 120
        N = s * s
        x, up, down, _, _ = _inputs(T, d, N, 3, 5, bad_ids=False)
        lp = _rule_logprobs(T, s, 5, "random")
        ws = torch.full((gr.rule_workspace_bytes(T, K, N, d),), 255, dtype=torch.uint8)
        gr.rule_launch(x, up, down, lp, K, 0, torch.empty(T, d), ws)
        npanels = 2 * s
        words = ws.view(torch.int32)
        # rule_launch's carving: router scratch, rule, slot counts, slots.
        off = (align(_WS_ROWS * min(K, s) * T * 4) + align(T * 8)) // 4
        pcount = words[off: off + npanels]
        off2 = off + align(npanels * 4) // 4
        pslot = words[off2: off2 + npanels * T].view(npanels, T)
        got = [set() for _ in range(T)]
        for p in range(npanels):
            for t in pslot[p, : int(pcount[p])].tolist():
                got[t].add(p)
        _, idx = ops.product_key_topk_reference(lp[:, :s], lp[:, s:], K, "product")
        xr = torch.argsort(torch.argsort(-lp[:, :s], dim=1, stable=True), dim=1)
        yr = torch.argsort(torch.argsort(-lp[:, s:], dim=1, stable=True), dim=1)
        xi = torch.argsort(-lp[:, :s], dim=1, stable=True)
        yi = torch.argsort(-lp[:, s:], dim=1, stable=True)
        e = idx.long()
        a, b = xr.gather(1, e // s), yr.gather(1, e % s)
        R = min(s, math.isqrt(K))
        for t in range(T):
            cost = [(A + (int(b[t][a[t] >= A].max()) + 1 if (a[t] >= A).any() else A), A) for A in range(R + 1)]
            A = min(cost)[1]
            B = min(cost)[0] - A
            want = {int(i) for i in xi[t, :A]} | {s + int(j) for j in yi[t, :B]}
            assert got[t] == want, (t, sorted(got[t]), sorted(want))


INTERP_CASES = {
    "geometry": _geometry_case,
    "bad_inputs": _bad_inputs_case,
    "line_counts": _line_counts_case,
    # 81x81 grid: 3 panels per row, 2 chunks per panel (the last one ragged), T = 37: ragged blocks.
    "panels_chunks_fp32": lambda: _grid_case(37, 24, 81 * 81, 40),
    "panels_chunks_one_program": lambda: _grid_case(37, 24, 81 * 81, 40, consts=dict(SMALL, GR_PROGRAMS=1), seed=1),
    "panels_chunks_fp16": lambda: _grid_case(37, 24, 81 * 81, 40, dtype=torch.float16, seed=2),
    # Most pairs of a token in one column: column panels (3 parts per column, ragged last chunk).
    "column_panels_fp32": lambda: _grid_case(37, 24, 81 * 81, 60, ids="columns", seed=10),
    # Product-key routing: top rows and top columns of each token's staircase, both panel kinds.
    "product_routing_fp16": lambda: _grid_case(41, 24, 40 * 40, 90, dtype=torch.float16, ids="product", seed=11),
    "one_panel_per_row_fp16": lambda: _grid_case(37, 24, 30 * 30, 40, dtype=torch.float16, seed=3),
    # Dense routing in few rows: many slots per panel (several blocks each), d not a tile multiple.
    "dense_rows_gelu": lambda: _grid_case(50, 20, 100, 60, act="gelu", seed=4),
    "dense_rows_relu": lambda: _grid_case(50, 20, 100, 60, act="relu", seed=5),
    "gelu_tanh_k1": lambda: _grid_case(19, 16, 49, 1, act="gelu_tanh", seed=6),
    "k_eq_n": lambda: _grid_case(9, 16, 16, 16, seed=7),
    "t1_no_prealloc": lambda: _grid_case(1, 16, 36, 5, prealloc=False, seed=8),
    # The shipped tile sizes (one chunk of 64 at this N), as "auto" picks them.
    "default_tiles_auto": lambda: _grid_case(260, 32, 400, 40, consts={"GR_PROGRAMS": 2}, auto=True, seed=9),
    # From the router's rule (rule_launch): 30x30 grid (2 chunks per line, the last ragged).
    "rule_fp32": lambda: _rule_case(37, 24, 30, 90),
    "rule_bf16_ties_fp16": lambda: _rule_case(37, 24, 30, 200, dtype=torch.float16, seed=1, kind="bf16"),
    "rule_coarse_ties_gelu": lambda: _rule_case(23, 16, 30, 100, act="gelu", seed=2, kind="coarse"),
    # 10x10 grid, K = 70: most tokens in most lines, several blocks per panel, 2 programs.
    "rule_dense_blocks": lambda: _rule_case(45, 20, 10, 70, seed=3, consts=dict(SMALL, GR_RULE_PROGRAMS=2)),
    "rule_no_prealloc_relu": lambda: _rule_case(5, 16, 12, 144, act="relu", seed=4, prealloc=False),
    "rule_panels": _rule_panels_case,
}


def test_schedule_choice():
    """Boundaries of `use_grid_row` / `use_dense` (what "auto" and OmniMoELayer run)."""
    from omnimoe.kernels import experts as ke

    for K in (512, 1024, 2048, 4096):  # paper configs: the op's auto runs grid rows, never the hybrid
        assert ke.use_grid_row(4096, K, 102400) and ke.use_expert_centric(4096, K, 102400)
    # The layer: grid lines up to K=2048 (measured faster than dense and hybrid), dense GEMMs from K/N = 1/32.
    assert not ke.use_dense(4096, 512, 102400) and ke.use_dense(4096, 3200, 102400) and not ke.use_dense(4096, 3199, 102400)
    assert not ke.use_dense(4096, 2048, 102400) and ke.use_dense(4096, 4096, 102400)
    assert ke.use_grid_row(256, 8000, 102400) and not ke.use_grid_row(255, 8000, 102400)  # token floor
    assert ke.use_grid_row(4096, 500, 102400) and not ke.use_grid_row(4096, 499, 102400)  # 20 pairs per expert
    assert not ke.use_grid_row(4096, 16, 4096)  # readme: token-centric
    assert not ke.use_grid_row(4096, 16, 1 << 20) and not ke.use_grid_row(64, 4096, 102400)
    assert not ke.use_grid_row(4096, 600, 102399)  # no square grid: the sorted-pairs schedules
    # The line-count histograms hold s*P < GR_MAX_LINE_BINS panels per direction: N <= 1600^2.
    assert ke.use_grid_row(70_000, 4096, 1600**2) and not ke.use_grid_row(70_000, 4096, 1601**2)
    assert ke.use_expert_centric(4096, 600, 102399) and not ke.use_grid_row(4096, 600, 102399)
    # Workspace: covers grid rows wherever auto may pick them for some T <= max_tokens.
    from omnimoe.kernels import grid_row as gr

    assert ke.expert_workspace_bytes(4096, 512, 102400, 1024) >= gr.workspace_bytes(4096, 512, 102400, 1024)
    assert ke.expert_workspace_bytes(300, 8000, 102400, 64) >= gr.workspace_bytes(300, 8000, 102400, 64)
    assert ke.expert_workspace_bytes(255, 8000, 102400, 64) < gr.workspace_bytes(255, 8000, 102400, 64)
    # The layer's rule-driven grid lines: product gates, 64 < K <= 4096, one panel per line (s <= 320).
    assert gr.rule_supported(4096, 512, 102400) and gr.rule_supported(4096, 65, 102400)
    assert not gr.rule_supported(4096, 64, 102400) and not gr.rule_supported(70_000, 4097, 102400 * 4)
    assert not gr.rule_supported(4096, 512, 321 * 321) and not gr.rule_supported(4096, 600, 102399)
    assert gr.rule_workspace_bytes(4096, 64, 102400, 1024) == 0 < gr.rule_workspace_bytes(4096, 512, 102400, 1024)
    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    x = torch.zeros(4096, 16)
    for gate, K, N, want in (("product", 512, 102400, True), ("softmax", 512, 102400, False),
                             ("product", 64, 102400, False), ("product", 512, 321 * 321, False),
                             ("product", 100, 102400, False)):  # K = 100: too few pairs per expert for grid lines
        layer = OmniMoELayer(OmniMoEConfig(hidden_size=16, intermediate_size=0, num_experts=N, top_k=K, gate=gate))
        assert layer._grid_from_rule(x) == want, (gate, K, N)


@pytest.mark.parametrize("rule", [False, True])
def test_panel_kernel_compiles_for_sm90_without_spills(rule):
    """The shipped 16-bit panel kernel at the paper shape (N = 320^2: 5 chunks of 64), bf16, through
    triton's code generator for sm_90, with gates from the pair list and from the rule: its
    accumulators fit in registers (no local memory) and its shared memory in the 227 KiB an H200
    block may use."""
    import inspect
    import subprocess

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnimoe.kernels import grid_row as gr

    cfg = gr.panel_config(102400, False, 0, rule=rule)
    assert cfg["NCH"] == 5
    warps, stages = cfg.pop("num_warps"), cfg.pop("num_stages")
    params = list(inspect.signature(gr._gr_panel_kernel.fn).parameters)
    ptr_types = {"x_ptr": "*bf16", "up_ptr": "*bf16", "down_ptr": "*bf16", "sgate_ptr": "*fp32", "gscr_ptr": "*fp32",
                 "hscr_ptr": "*fp32", "y_ptr": "*fp32", "wsf_ptr": "*fp32"}
    sig = {p: "constexpr" if p in cfg else ptr_types.get(p, "*i32" if p.endswith("_ptr") else "i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p.endswith("_ptr") or p == "D"}
    kernel = triton.compile(ASTSource(fn=gr._gr_panel_kernel, signature=sig, constexprs=cfg, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    assert kernel.metadata.shared <= (113 if rule else 227) * 1024  # the rule config: two blocks per SM
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cuobjdump.exists():
        pytest.skip("triton ships no cuobjdump here: register use not checked")
    cubin = Path(__import__("tempfile").mkdtemp()) / "panel.cubin"
    cubin.write_bytes(kernel.asm["cubin"])
    usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    line = next(entry for entry in usage.splitlines() if "REG:" in entry)
    assert " STACK:0 " in line and " LOCAL:0 " in line, line


def _interpret(extra_args=()):
    return interpret(__file__, extra_args, {"TRITON_DEFAULT_FP_FUSION": "1"})


@pytest.fixture(scope="module")
def interp_results():
    return _interpret()


@pytest.mark.parametrize("case", list(INTERP_CASES))
def test_interpreter(case, interp_results):
    assert interp_results[case] == "ok", interp_results[case]


# Each mutation breaks one piece of the schedule; the listed cases must then fail.
MUTATIONS = {
    "duplicates_overwrite": "panels_chunks_fp32",  # gates stored instead of added
    "skip_last_block": "dense_rows_gelu",  # last (ragged) block of each panel dropped
    "drop_last_chunk": "panels_chunks_fp32",  # the second chunk of every panel ignored
    "keep_out_of_range": "panels_chunks_fp32",  # out-of-range ids clamped into the grid
    "columns_as_rows": "column_panels_fp32",  # column panels read as rows (unit stride)
    "all_to_rows_keys_only": "product_routing_fp16",  # histogram keys by rows, scatter by the choice
    "column_counts_dropped": "line_counts",  # the column-panel histogram never stored
    "rule_columns_keep_top_rows": "rule_fp32",  # column spans start at x rank 0: row panels' pairs twice
    "rule_ties_by_theta_only": "rule_coarse_ties_gelu",  # every tie at theta admitted (no e_star)
    "rule_skip_last_block": "rule_dense_blocks",  # last (ragged) block of each panel dropped
    "rule_no_column_panels": "rule_fp32",  # tokens never enter their column panels
    "rule_lines_not_fewest": "rule_panels",  # A minimises w(A) alone (a valid cover, more lines)
    "rule_column_spans_short": "rule_fp32",  # column spans miss the column lanes' rows (>= R)
    "rule_scatter_next_slot": "rule_dense_blocks",  # each span's gates land in the next slot's row
}


def test_mutations():
    res = _interpret(["--mutations"])
    for mutation, case in MUTATIONS.items():
        assert res[mutation] != "ok", f"{mutation}: {case} still passes with a broken kernel"


def _mutated(name):
    """Replace one launch with a broken equivalent (CPU interpreter only)."""
    import triton
    import triton.language as tl

    from omnimoe.kernels import grid_row as gr

    if name == "duplicates_overwrite":
        src = _src(gr, "_gr_panel_kernel").replace(
            'tl.atomic_add(g_base + sl * GW + col, gv, mask=qm, sem="relaxed")', "tl.store(g_base + sl * GW + col, gv, mask=qm)")
        return _rejit(gr, "_gr_panel_kernel", src)
    if name == "skip_last_block":
        return _rejit(gr, "_gr_blocks_kernel", _src(gr, "_gr_blocks_kernel").replace("(s1 - s0 + BM - 1) // BM", "(s1 - s0) // BM"))
    if name == "drop_last_chunk":
        orig = gr.panel_config
        gr.panel_config = lambda *a, **kw: dict(orig(*a, **kw), NCH=max(1, orig(*a, **kw)["NCH"] - 1))
        return None
    if name == "keep_out_of_range":
        src = _src(gr, "_gr_pair").replace("valid = m & (e >= 0) & (e < N)", "valid = m")
        src = src.replace("tl.where(valid, e, 0)", "tl.minimum(tl.maximum(e, 0), N - 1)")
        return _rejit(gr, "_gr_pair", src)
    if name == "columns_as_rows":
        return _rejit(gr, "_gr_panel_kernel", _src(gr, "_gr_panel_kernel").replace(
            "estride = tl.where(is_col, S, 1)", "estride = 1"))
    if name == "column_counts_dropped":
        return _rejit(gr, "_gr_line_count_kernel", _src(gr, "_gr_line_count_kernel").replace(
            "h_col, mask=bm)", "h_col, mask=bm & (b < 0))"))
    if name == "all_to_rows_keys_only":
        src = _src(gr, "_gr_histogram_kernel").replace(
            "key, _ = _gr_key(e, offs // K, valid, lcounts_ptr, S, P, PWR, T)",
            "key = _gr_line_panels(e, S, P, PWR)[0] * T + offs // K")
        return _rejit(gr, "_gr_histogram_kernel", src)
    rule_edits = {
        "rule_columns_keep_top_rows": ("_gr_rule_route_kernel", "b | (A << 10)", "b"),
        "rule_ties_by_theta_only": ("_gr_rule_scatter", "((key == theta) & (e < e_star))", "(key == theta)"),
        "rule_skip_last_block": ("_gr_rule_blocks_kernel", "+ BM - 1) // BM", ") // BM"),
        "rule_no_column_panels": ("_gr_rule_route_kernel", "range(0, B, BLOCK_L)", "range(0, 0, BLOCK_L)"),
        "rule_lines_not_fewest": ("_gr_rule_route_kernel", "lanes + w, 1 << 30", "w, 1 << 30"),
        "rule_column_spans_short": ("_gr_rule_route_kernel", "c = lo + tl.load(", "c = lo + 0 * tl.load("),
        "rule_scatter_next_slot": ("_gr_rule_scatter", "m = tl.where(qm, m, 0)", "m = tl.where(qm, m + 1, 0)"),
    }
    if name in rule_edits:
        fn, old, new = rule_edits[name]
        src = _src(gr, fn)
        assert old in src, (name, old)
        return _rejit(gr, fn, src.replace(old, new))
    raise KeyError(name)
    del triton, tl


def _src(module, name):
    text = Path(module.__file__).read_text()
    start = text.index(f"\ndef {name}(") + 1
    ends = [i for i in (text.find("\n@", start), text.find("\ndef ", start)) if i > 0]
    return text[start:min(ends)]


def _rejit(module, name, src):
    import textwrap

    import triton

    ns = dict(vars(module))
    src = textwrap.dedent(src)
    assert src.startswith("def ")
    exec(compile(src, f"<mutated {name}>", "exec"), ns)  # noqa: S102 - test-only source rewrite
    setattr(module, name, triton.jit(ns[name]))


# ----------------------------------------------------------------------------------------- GPU
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _product_routing(T, s, K, seed):
    gen = torch.Generator().manual_seed(seed)
    px = torch.log_softmax(torch.randn(T, s, generator=gen), -1).cuda()
    py = torch.log_softmax(torch.randn(T, s, generator=gen), -1).cuda()
    return ops.product_key_topk_reference(px, py, K, "product")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,d,N,K", [(1000, 256, 102400, 512), (333, 200, 4096, 100), (300, 128, 1 << 20, 300),
                                     (257, 96, 81 * 81, 1000)])
def test_gpu_grid_bf16_and_fp32(T, d, N, K):
    from omnimoe.kernels import expert_workspace_bytes
    from omnimoe.kernels import grid_row as gr
    from omnimoe.kernels.experts import expert_grouped_matmul_triton

    s = int(N**0.5)
    gates, idx = _product_routing(T, s, K, 0)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, d, device="cuda", generator=gen)
    up = torch.randn(N, d, device="cuda", generator=gen) * d**-0.5
    down = torch.randn(N, d, device="cuda", generator=gen) * d**-0.5
    idx[:, 1] = idx[:, 0]  # duplicates add
    idx[0, 2], idx[-1, 3] = N, -1  # out of range: nothing
    for dtype, tol in ((torch.bfloat16, None), (torch.float32, 1e-5)):
        xx, uu, dd_ = x.to(dtype), up.to(dtype), down.to(dtype)
        # An explicit "grid" needs the schedule's own workspace ("auto" may not pick it at this T*K).
        need = max(expert_workspace_bytes(T, K, N, d), gr.workspace_bytes(T, K, N, d))
        ws = torch.full((need,), 255, device="cuda", dtype=torch.uint8)
        out = torch.full((T, d), float("nan"), device="cuda", dtype=dtype)
        expert_grouped_matmul_triton(xx, uu, dd_, gates, idx, "silu", out=out, workspace=ws, schedule="grid")
        yr = _reference(xx, uu, dd_, gates, idx, "silu")
        err = rel_err(out, yr)
        if tol is None:
            # PEER-style bf16 arithmetic on the same routing is the yardstick.
            ok = (idx >= 0) & (idx < N)
            e = torch.where(ok, idx, 0).long()
            h = torch.nn.functional.silu(torch.einsum("tkd,td->tk", uu[e], xx)) * (gates * ok).to(dtype)
            yp = torch.einsum("tk,tkd->td", h, dd_[e])
            tol = rel_err(yp, yr) * 1.05
        assert torch.isfinite(out).all() and err <= tol, (dtype, err, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_grid_graph_capture_no_alloc():
    from omnimoe.kernels import expert_workspace_bytes
    from omnimoe.kernels.experts import expert_grouped_matmul_triton

    T, d, N, K = 700, 256, 102400, 4096  # "auto" picks grid rows here, so expert_workspace_bytes covers it
    gates, idx = _product_routing(T, 320, K, 3)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    up = (torch.randn(N, d, device="cuda") * d**-0.5).to(torch.bfloat16)
    down = (torch.randn(N, d, device="cuda") * d**-0.5).to(torch.bfloat16)
    ws = torch.empty(expert_workspace_bytes(T, K, N, d), device="cuda", dtype=torch.uint8)
    out = torch.empty(T, d, device="cuda", dtype=torch.bfloat16)
    from omnimoe.kernels.experts import use_grid_row

    assert use_grid_row(T, K, N)
    run = lambda: expert_grouped_matmul_triton(x, up, down, gates, idx, "silu", out=out, workspace=ws)  # noqa: E731
    _allocation_free_and_graph_replays(run, out, 4e-3)  # fp32 atomics: the order may differ, then a bf16 rounding


def _allocation_free_and_graph_replays(run, out, tol):
    """run() (outputs and workspace given) on a side stream allocates nothing, and its CUDA graph's
    replay reproduces out within tol."""
    run()
    ref = out.clone()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    out.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, ref) <= tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,d,s,K,kind", [(1000, 256, 320, 512, "bf16"), (300, 128, 320, 2048, "random"),
                                          (257, 96, 81, 1000, "coarse")])
def test_gpu_rule_bf16_fp32_and_graph(T, d, s, K, kind):
    """grid_row.rule_launch at real sizes against the reference router + op on the same log-probs:
    bf16 within PEER-style bf16 arithmetic's error, fp32 within 1e-5; with a workspace given it
    allocates nothing and replays as a CUDA graph."""
    from omnimoe.kernels import grid_row as gr

    N = s * s
    lp = _rule_logprobs(T, s, 0, kind).cuda()
    gates, idx = ops.product_key_topk_reference(lp[:, :s], lp[:, s:], K, "product")
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(T, d, device="cuda", generator=gen)
    up = torch.randn(N, d, device="cuda", generator=gen) * d**-0.5
    down = torch.randn(N, d, device="cuda", generator=gen) * d**-0.5
    ws = torch.full((gr.rule_workspace_bytes(T, K, N, d),), 255, device="cuda", dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        xx, uu, dd_ = x.to(dtype), up.to(dtype), down.to(dtype)
        out = torch.full((T, d), float("nan"), device="cuda", dtype=dtype)
        gr.rule_launch(xx, uu, dd_, lp, K, 0, out, ws)
        yr = _reference(xx, uu, dd_, gates, idx, "silu")
        tol = 1e-5
        if dtype == torch.bfloat16:
            e = idx.long()
            h = torch.nn.functional.silu(torch.einsum("tkd,td->tk", uu[e], xx)) * gates.to(dtype)
            tol = rel_err(torch.einsum("tk,tkd->td", h, dd_[e]), yr) * 1.05
        assert torch.isfinite(out).all() and rel_err(out, yr) <= tol, (dtype, rel_err(out, yr), tol)
    # fp32: only the order of the atomic adds may differ
    _allocation_free_and_graph_replays(lambda: gr.rule_launch(xx, uu, dd_, lp, K, 0, out, ws), out, 1e-5)


if __name__ == "__main__" and "--interpret" in sys.argv:
    if "--mutations" in sys.argv:
        results = {}
        for mutation, case in MUTATIONS.items():
            import importlib

            import omnimoe.kernels.grid_row as _gr

            importlib.reload(_gr)
            _mutated(mutation)
            results[mutation] = run_cases({case: INTERP_CASES[case]})[case]
        importlib.reload(_gr)
    else:
        results = run_cases(INTERP_CASES)
    report(results)
