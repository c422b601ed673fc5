"""Triton kernels vs the reference ops (omnimoe.ops).

CPU: the kernels run under TRITON_INTERPRET=1 in ONE subprocess (the variable must be set before
triton is imported, which the rest of the suite may already have done); each case below is its own
parametrised test reading that subprocess's verdict. GPU (`-m gpu`): correctness at real sizes,
CUDA-graph capture of the whole layer, and the allocation-free / sync-free launcher contract.
"""
from __future__ import annotations

import os
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

ACTS = ("silu", "gelu", "relu", "gelu_tanh")


# ------------------------------------------------------------------------------- shared checks
def _rand_log_probs(T, s, gen, ties=False, device="cpu"):
    if ties:
        # Few distinct values: many exact ties, exercised on both axes and in the sums.
        lx = torch.randint(0, 3, (T, s), generator=gen).float() * -0.5
        ly = torch.randint(0, 3, (T, s), generator=gen).float() * -0.5
        return lx.to(device), ly.to(device)
    lx = torch.log_softmax(2 * torch.randn(T, s, generator=gen), -1)
    ly = torch.log_softmax(2 * torch.randn(T, s, generator=gen), -1)
    return lx.to(device), ly.to(device)


def assert_topk_matches(px, py, K, gate, g, i, gr, ir, tie_tol=0.0):
    """Same experts in the same order as the reference; where sets differ, only by near-ties."""
    assert g.shape == (px.shape[0], K) and i.shape == g.shape and g.dtype == torch.float32 and i.dtype == torch.int32
    s = px.shape[1]
    same = (i == ir).all(dim=1)
    for t in torch.nonzero(~same).flatten().tolist():
        # Allowed only as a near-tie: every expert's score within tie_tol of the reference's.
        sc = lambda e: (px[t, e // s] + py[t, e % s]).double()  # noqa: E731
        a, b = sc(i[t].long()), sc(ir[t].long())
        assert len(set(i[t].tolist())) == K, f"token {t}: duplicate experts {i[t].tolist()}"
        assert (a - b).abs().max() <= tie_tol, f"token {t}: {i[t].tolist()} vs reference {ir[t].tolist()}"
    frac = same.float().mean().item() if len(same) else 1.0
    assert frac >= 0.999 or tie_tol > 0, f"only {frac:.4f} of tokens agree"
    if same.any():
        torch.testing.assert_close(g[same], gr[same], rtol=1e-5, atol=1e-7)


def rel_err(y, yr):
    return float((y.double() - yr.double()).norm() / yr.double().norm().clamp_min(1e-30))


def _expert_inputs(T, d, N, K, gen, dtype=torch.float32, device="cpu", dups=False):
    if torch.device(device).type != gen.device.type:
        gen = torch.Generator(device=device).manual_seed(gen.initial_seed())
    kw = dict(generator=gen, device=device)
    x = torch.randn(T, d, **kw).to(dtype)
    up = (torch.randn(N, d, **kw) * d**-0.5).to(dtype)
    down = (torch.randn(N, d, **kw) * d**-0.5).to(dtype)
    g = torch.rand(T, K, **kw)
    if dups or T == 0:
        idx = torch.randint(0, N, (T, K), **kw)
    else:
        idx = torch.stack([torch.randperm(N, **kw)[:K] for _ in range(T)])
    return x, up, down, g, idx.to(torch.int32)


# ------------------------------------------------------------------ interpreter cases (CPU, fp32)
def _router_case(T, s, K, gate, ties=False, prealloc=False, strided=False, seed=0, path="small", sort=True):
    from omnimoe.kernels import router

    # Both router kernels are exercised at tiny K: "large" disables the register-only path (for
    # this case only: the cases after it see the default again).
    default = router.SMALL_K_MAX
    router.SMALL_K_MAX = default if path == "small" else 0
    try:
        _router_case_body(T, s, K, gate, ties, prealloc, strided, seed, sort)
    finally:
        router.SMALL_K_MAX = default


def _reference_order(px, py, g, i):
    """sort=False outputs (the same pairs in any order) in the reference's order: score
    px[e // s] + py[e % s] descending, expert ascending."""
    s = px.shape[1]
    by_expert = torch.argsort(i, dim=1, stable=True)
    g, i = g.gather(1, by_expert), i.gather(1, by_expert)
    e = i.long()
    score = px.gather(1, e // s) + py.gather(1, e % s)
    by_score = torch.argsort(-score, dim=1, stable=True)
    return g.gather(1, by_score), i.gather(1, by_score)


def _router_case_body(T, s, K, gate, ties, prealloc, strided, seed, sort=True):
    from omnimoe.kernels import product_key_topk_triton, topk_workspace_bytes

    gen = torch.Generator().manual_seed(seed)
    px, py = _rand_log_probs(T, s, gen, ties)
    if strided:  # rows of a wider buffer: the kernel must honour stride(0)
        px = torch.cat([px, torch.zeros(T, 3)], 1)[:, :s]
        py = torch.cat([py, torch.zeros(T, 5)], 1)[:, :s]
    kw = {}
    if prealloc:
        kw = dict(gates_out=torch.empty(T, K), indices_out=torch.empty(T, K, dtype=torch.int32),
                  workspace=torch.empty(topk_workspace_bytes(T, s, K), dtype=torch.uint8))
    g, i = product_key_topk_triton(px, py, K, gate, sort=sort, **kw)
    if prealloc:
        assert g.data_ptr() == kw["gates_out"].data_ptr() and i.data_ptr() == kw["indices_out"].data_ptr()
    if not sort:
        g, i = _reference_order(px, py, g, i)
    gr, ir = ops.product_key_topk_reference(px, py, K, gate)
    assert_topk_matches(px, py, K, gate, g, i, gr, ir)


def _f32_keys(v):
    """The router's order-preserving int32 image of fp32 values (router._f32_key)."""
    b = v.float().contiguous().view(torch.int32)
    return b ^ ((b >> 31) & 0x7FFFFFFF)


def threshold_winners(px, py, theta, e_star):
    """[T, s*s] bool: the experts the (theta, e_star) rule of product_key_threshold_triton admits."""
    T, s = px.shape
    key = _f32_keys((px[:, :, None] + py[:, None, :]).reshape(T, s * s))
    e = torch.arange(s * s, device=px.device)
    th, es = theta[:, None], e_star[:, None]
    return (key > th) | ((key == th) & (e[None, :] < es))


def _dominant_row_log_probs(T, s, K, gen):
    """Log-probs whose top-K all lie in one grid row, with the K-th and (K+1)-th columns tied
    exactly: the (K+1)-th lies outside the ranks the router searches, yet ties theta."""
    px = torch.full((T, s), -30.0)
    px[:, 7] = -0.01
    py = -torch.arange(s, dtype=torch.float32).repeat(T, 1) * 0.01
    py[:, K - 1] = py[:, K] = -0.01 * (K - 0.5)
    return px, py[:, torch.randperm(s, generator=gen)]


def _threshold_case(T, s, K, ties=False, seed=0, prealloc=False, dominant_row=False):
    """The threshold router's rule admits exactly the reference's top-K set, ties included."""
    from omnimoe.kernels import router

    gen = torch.Generator().manual_seed(seed)
    px, py = _dominant_row_log_probs(T, s, K, gen) if dominant_row else _rand_log_probs(T, s, gen, ties)
    kw = {}
    if prealloc:
        kw = dict(theta_out=torch.empty(T, dtype=torch.int32), estar_out=torch.empty(T, dtype=torch.int32),
                  workspace=torch.empty(router.topk_workspace_bytes(T, s, K), dtype=torch.uint8))
    theta, e_star = router.product_key_threshold_triton(px, py, K, **kw)
    if prealloc:
        assert theta.data_ptr() == kw["theta_out"].data_ptr() and e_star.data_ptr() == kw["estar_out"].data_ptr()
    _, ir = ops.product_key_topk_reference(px, py, K, "product")
    ref = torch.zeros(T, s * s, dtype=torch.bool)
    ref.scatter_(1, ir.long(), True)
    win = threshold_winners(px, py, theta, e_star)
    assert torch.equal(win, ref), [t for t in range(T) if not torch.equal(win[t], ref[t])]


def _router_logits_case(T, s, K, gate, norm=True, prealloc=False, dtype=torch.float32, seed=0, device="cpu"):
    """The fused router tail (batch-norm affine + log-softmax + top-K) vs the reference top-K on
    torch's log-softmax of the same affine logits: same experts except at near-ties."""
    from omnimoe.kernels.router import router_logits_topk_triton

    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(T, 2 * s, generator=gen) * 2).to(dtype).to(device)
    scale = (torch.rand(2 * s, generator=gen) + 0.5).to(device) if norm else None
    shift = torch.randn(2 * s, generator=gen).to(device) if norm else None
    kw = {}
    if prealloc:
        kw = dict(gates_out=torch.full((T, K), float("nan"), device=device),
                  indices_out=torch.full((T, K), -1, dtype=torch.int32, device=device))
    g, i = router_logits_topk_triton(logits, scale, shift, K, gate, **kw)
    if prealloc:
        assert g.data_ptr() == kw["gates_out"].data_ptr() and i.data_ptr() == kw["indices_out"].data_ptr()
    lf = torch.addcmul(shift, logits, scale) if norm else logits.float()
    lp = torch.log_softmax(lf.view(T, 2, s), -1)
    px, py = lp[:, 0].contiguous(), lp[:, 1].contiguous()
    gr, ir = ops.product_key_topk_reference(px, py, K, gate)
    assert_topk_matches(px.cpu(), py.cpu(), K, gate, g.cpu(), i.cpu(), gr.cpu(), ir.cpu(), tie_tol=1e-5)


def _router_logits_bad_inputs_case():
    from omnimoe.kernels.router import router_logits_topk_triton

    lg = torch.randn(3, 8)
    for args in ((lg, None, None, 65, "product"), (lg, None, None, 0, "product"), (lg, torch.ones(8), None, 3, "product"),
                 (lg, torch.ones(7), torch.ones(7), 3, "product"), (torch.randn(3, 7), None, None, 3, "product"),
                 (lg, None, None, 3, "max"), (lg.t(), None, None, 3, "product")):
        with pytest.raises(OmniMoEInputError):
            router_logits_topk_triton(*args)
    with pytest.raises(OmniMoEInputError):
        router_logits_topk_triton(lg, None, None, 3, "product", gates_out=torch.empty(3, 2))


def _bad_workspace_case():
    from omnimoe.kernels import (expert_grouped_matmul_triton, expert_workspace_bytes, product_key_topk_triton, router,
                                 topk_workspace_bytes)

    gen = torch.Generator().manual_seed(1)
    px, py = _rand_log_probs(4, 6, gen)
    default = router.SMALL_K_MAX
    router.SMALL_K_MAX = 0  # the workspace-using router path at this tiny K
    try:
        for ws in (torch.empty(topk_workspace_bytes(4, 6, 8) - 1, dtype=torch.uint8), torch.empty(10000, dtype=torch.float32)):
            with pytest.raises(OmniMoEInputError):
                product_key_topk_triton(px, py, 8, "product", workspace=ws)
    finally:
        router.SMALL_K_MAX = default
    with pytest.raises(OmniMoEInputError):
        product_key_topk_triton(px, py, 8, "product", gates_out=torch.empty(4, 7))
    x, up, down, g, idx = _expert_inputs(8, 16, 9, 3, gen)
    with pytest.raises(OmniMoEInputError):
        expert_grouped_matmul_triton(x, up, down, g, idx, "silu", schedule="expert",
                                     workspace=torch.empty(expert_workspace_bytes(8, 3, 9, 16) - 4, dtype=torch.uint8))
    with pytest.raises(OmniMoEInputError):
        expert_grouped_matmul_triton(x, up, down, g, idx, "silu", out=torch.empty(8, 16, dtype=torch.float64))


def _expert_case(T, d, N, K, act, schedule, prealloc=False, dups=False, seed=0):
    from omnimoe.kernels import expert_grouped_matmul_triton, expert_workspace_bytes

    gen = torch.Generator().manual_seed(seed)
    x, up, down, g, idx = _expert_inputs(T, d, N, K, gen, dups=dups)
    kw = {}
    if prealloc:
        kw = dict(out=torch.full((T, d), float("nan")), workspace=torch.full((expert_workspace_bytes(T, K, N, d),), 255, dtype=torch.uint8))
    y = expert_grouped_matmul_triton(x, up, down, g, idx, act, schedule=schedule, **kw)
    yr = ops.expert_grouped_matmul_reference(x, up, down, g, idx, act)
    assert y.shape == (T, d) and y.dtype == x.dtype
    if prealloc:
        assert y.data_ptr() == kw["out"].data_ptr()
    if T:
        assert rel_err(y, yr) <= 1e-5, rel_err(y, yr)


def _dense_case(T, d, N, K, act, chunk_rows=None, dtype=torch.float32, seed=0, device="cpu"):
    from omnimoe.kernels import experts as ke

    gen = torch.Generator().manual_seed(seed)
    x, up, down, g, idx = _expert_inputs(T, d, N, K, gen, device=device)  # distinct ids per token
    x, up, down = x.to(dtype), up.to(dtype), down.to(dtype)
    default = ke._DENSE_CHUNK_ELEMENTS
    if chunk_rows:
        ke._DENSE_CHUNK_ELEMENTS = chunk_rows * N
    try:
        out = torch.full((T, d), float("nan"), dtype=dtype, device=device)
        y = ke.expert_dense_matmul(x, up, down, g, idx, act, out=out)
    finally:
        ke._DENSE_CHUNK_ELEMENTS = default
    assert y.data_ptr() == out.data_ptr()
    yr = ops.expert_grouped_matmul_reference(x, up, down, g, idx, act)
    assert rel_err(y, yr) <= (1e-5 if dtype == torch.float32 else 1e-2), rel_err(y, yr)


def _layer_dense_case():
    from omnimoe.kernels import experts as ke

    default = ke.DENSE_MIN_TOKENS
    ke.DENSE_MIN_TOKENS = 4  # the dense schedule at interpreter sizes
    try:
        assert ke.use_dense(10, 6, 16)
        _layer_case("product", "silu", T=10, K=6)
    finally:
        ke.DENSE_MIN_TOKENS = default


def _dense_rule_case(T, s, K, act, d=32, seed=0, chunk_rows=None, dtype=torch.float32, device="cpu", ties=False,
                     meta=None):
    """The rule-driven dense schedule (threshold router, GEMM, rule pass, GEMM) against the
    reference experts on the reference top-K of the same log-probs."""
    from omnimoe.kernels import dense_rule, router
    from omnimoe.kernels import experts as ke

    gen = torch.Generator().manual_seed(seed)
    N = s * s
    px, py = _rand_log_probs(T, s, gen, ties)
    x, up, down, _, _ = _expert_inputs(T, d, N, 1, gen, dtype=dtype)
    x, up, down, px, py = (t.to(device) for t in (x, up, down, px, py))
    log_probs = torch.cat([px, py], 1)
    assert dense_rule.rule_applies(K, "product") and not dense_rule.rule_applies(K, "softmax")
    theta, e_star = router.product_key_threshold_triton(log_probs[:, :s], log_probs[:, s:], K)
    out = torch.full((T, d), float("nan"), dtype=dtype, device=device)
    default = ke._DENSE_CHUNK_ELEMENTS
    if chunk_rows:
        ke._DENSE_CHUNK_ELEMENTS = chunk_rows * N
    try:
        dense_rule.dense_rule_launch(x, up, down, log_probs, theta, e_star, ke.ACT_IDS[act], out, meta)
    finally:
        ke._DENSE_CHUNK_ELEMENTS = default
    g, i = ops.product_key_topk_reference(px, py, K, "product")
    yr = ops.expert_grouped_matmul_reference(x.float(), up.float(), down.float(), g, i, act)
    assert rel_err(out.float(), yr) <= (1e-5 if dtype == torch.float32 else 5e-3), rel_err(out.float(), yr)


def _rule_meta(**kw):
    from omnimoe.kernels import dense_rule

    return dense_rule.rule_pass_config(**kw)


def _layer_dense_rule_case():
    """The layer at K > SMALL_K_MAX, product gates and high density takes the rule-driven dense
    schedule (fp32, within the layer case's 1e-5)."""
    from omnimoe.kernels import experts as ke

    default = ke.DENSE_MIN_TOKENS
    ke.DENSE_MIN_TOKENS = 4
    try:
        assert ke.use_dense(10, 70, 144)
        _layer_case("product", "silu", T=10, K=70, N=144, inter=24)
    finally:
        ke.DENSE_MIN_TOKENS = default


def _layer_case(gate, act, router_norm="batchnorm", inter=16, T=10, K=6, N=16, grad=False, dtype=torch.float32):
    """The whole triton-backend layer (fused SwiGLU product and residual add included) vs the reference.

    Without autograd (the default) this is the launch-lean inference path (`_forward_fast`: fused
    router tail for K <= 64, token-centric or expert-centric experts by `use_expert_centric`);
    with grad=True the autograd-preserving `_forward_fused`."""
    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    torch.manual_seed(0)
    cfg = OmniMoEConfig(hidden_size=32, intermediate_size=inter, num_experts=N, top_k=K, hidden_act=act, gate=gate,
                        router_norm=router_norm)
    layer = OmniMoELayer(cfg).eval()
    with torch.no_grad():
        for norm in (getattr(layer, "router_norm_x", None), getattr(layer, "router_norm_y", None)):
            if norm is not None:
                norm.running_mean.normal_(0, 0.3)
                norm.running_var.uniform_(0.5, 2)
    x = torch.randn(2, T // 2, 32) if T % 2 == 0 else torch.randn(T, 32)
    layer, x = layer.to(dtype), x.to(dtype)
    # fp16: the fused shared-MLP GEMM runs (gate and up unrounded), the reference rounds them.
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    with torch.no_grad():
        yr = layer(x)
    layer.backend = "triton"
    with torch.set_grad_enabled(grad):
        assert layer._fast_inference(x) == (not grad)
        y = layer(x)
        g, i = layer.route(x.reshape(-1, 32))
    with torch.no_grad():
        layer.backend = "reference"
        gr, ir = layer.route(x.reshape(-1, 32))
    assert torch.equal(i, ir) and rel_err(g, gr) <= tol
    y = y.detach()
    assert y.shape == x.shape and y.dtype == x.dtype and rel_err(y.float(), yr.float()) <= tol, rel_err(y.float(), yr.float())


def _gated_mlp_case(act, T=70, d=64, inter=136, seed=0):
    """The fused shared-MLP hidden (fp16: the interpreter misreads bf16 descriptor tiles) on ragged
    edges (T, I not multiples of the tiles) against act(x Wg^T) * (x Wu^T) in fp32, in each launch
    config: persistent configs run one program here (the interpreter is one SM), looping over
    every tile; programs_per_sm=0 runs one program per tile."""
    from omnimoe.kernels import experts as ke
    from omnimoe.kernels import swiglu

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g).half()
    wg, wu = ((torch.randn(inter, d, generator=g) * d**-0.5).half() for _ in range(2))
    assert swiglu.gated_mlp_fusable(x, wg, wu) and not swiglu.gated_mlp_fusable(x.float(), wg.float(), wu.float())
    ref = ops.activation(act)(x.float() @ wg.float().t()) * (x.float() @ wu.float().t())
    configs = [*swiglu.GATED_MLP_CONFIGS.values(), dict(swiglu.GATED_MLP_CONFIGS["beside_large_router"], programs_per_sm=0)]
    for config in configs:
        h = swiglu.gated_mlp_fast(x, wg, wu, ke.ACT_IDS[act], config)
        assert h.dtype == torch.float16 and h.shape == (T, inter) and rel_err(h.float(), ref) <= 2e-3, (config, rel_err(h.float(), ref))


_ROUTER_CASES = {
    "router_k_gt_s_product": lambda p: _router_case(5, 8, 16, "product", path=p),
    "router_k_gt_s_softmax": lambda p: _router_case(5, 8, 16, "softmax", seed=1, path=p),
    "router_k_lt_s": lambda p: _router_case(6, 8, 3, "product", seed=2, path=p),
    "router_k_eq_n_softmax": lambda p: _router_case(3, 5, 25, "softmax", seed=3, path=p),
    "router_k1": lambda p: _router_case(4, 6, 1, "product", seed=4, path=p),
    "router_t0": lambda p: _router_case(0, 6, 4, "product", path=p),
    "router_t1_k_gt_s": lambda p: _router_case(1, 16, 40, "softmax", seed=5, path=p),
    "router_ties_product": lambda p: _router_case(4, 6, 7, "product", ties=True, seed=6, path=p),
    "router_ties_softmax_k_gt_s": lambda p: _router_case(3, 4, 9, "softmax", ties=True, seed=7, path=p),
    "router_prealloc_strided": lambda p: _router_case(3, 7, 10, "product", prealloc=True, strided=True, seed=8, path=p),
}

# The large-K kernel's lanes (issue 11): row lanes a < isqrt(K), column lanes b < K // (isqrt(K)+1).
# K at and around squares (lane counts change), K = s^2 (every pair), column lanes longer than row
# lanes, and ties spread over both lane kinds; "large" path only.
_LANE_CASES = {
    "router_lanes_k_square_ties": lambda: _router_case(4, 9, 81, "product", ties=True, seed=30, path="large"),
    "router_lanes_k_square_minus_1": lambda: _router_case(4, 10, 99, "softmax", seed=31, path="large"),
    "router_lanes_k_square_plus_1_ties": lambda: _router_case(5, 12, 65, "product", ties=True, seed=32, path="large"),
    "router_lanes_long_columns": lambda: _router_case(4, 16, 66, "product", seed=33, path="large"),
    "router_lanes_ties_k_lt_s": lambda: _router_case(5, 20, 13, "softmax", ties=True, seed=34, path="large"),
    # 809 / 760 ties at theta for 252 / 496 free slots: more than one CHUNK (512) of ties (reloaded).
    "router_ties_beyond_one_chunk": lambda: _router_case(2, 50, 1000, "product", ties=True, seed=37, path="large"),
    # sort=False (the layer's routed sum): the same pairs and gates, unordered.
    "router_unsorted_product": lambda: _router_case(4, 12, 70, "product", seed=35, path="large", sort=False),
    "router_unsorted_softmax_ties": lambda: _router_case(5, 9, 40, "softmax", ties=True, seed=36, path="large",
                                                         sort=False),
}

_THRESHOLD_CASES = {
    "threshold_k_gt_s": lambda: _threshold_case(5, 12, 70, seed=40),
    "threshold_k_eq_n_ties": lambda: _threshold_case(3, 9, 81, ties=True, seed=41),
    "threshold_ties_prealloc": lambda: _threshold_case(6, 16, 100, ties=True, seed=42, prealloc=True),
    "threshold_ties_beyond_one_chunk": lambda: _threshold_case(2, 50, 1000, ties=True, seed=37),
    "threshold_t0": lambda: _threshold_case(0, 12, 70),
    "threshold_tie_outside_searched_ranks": lambda: _threshold_case(2, 100, 70, seed=43, dominant_row=True),
}

INTERP_CASES = {
    **_THRESHOLD_CASES,
    **{f"{name}_{p}": (lambda f=f, p=p: f(p)) for name, f in _ROUTER_CASES.items() for p in ("small", "large")},
    **_LANE_CASES,
    "bad_workspace_and_out": _bad_workspace_case,
    **{f"experts_{act}_{sch}": (lambda a=act, sc=sch: _expert_case(7, 24, 36, 5, a, sc, seed=9))
       for act in ACTS for sch in ("token", "expert", "hybrid")},
    "experts_k_eq_n_hybrid": lambda: _expert_case(5, 16, 9, 9, "relu", "hybrid", seed=10),
    "experts_prealloc_hybrid": lambda: _expert_case(6, 20, 25, 4, "silu", "hybrid", prealloc=True, seed=12),
    "experts_t0_hybrid": lambda: _expert_case(0, 16, 9, 3, "silu", "hybrid"),
    "experts_k_eq_n_token": lambda: _expert_case(5, 16, 9, 9, "silu", "token", seed=10),
    "experts_k_eq_n_expert": lambda: _expert_case(5, 16, 9, 9, "gelu", "expert", seed=10),
    "experts_t0_token": lambda: _expert_case(0, 16, 9, 3, "silu", "token"),
    "experts_t0_expert": lambda: _expert_case(0, 16, 9, 3, "silu", "expert"),
    "experts_t1_expert": lambda: _expert_case(1, 16, 9, 4, "relu", "expert", seed=11),
    "experts_prealloc_expert": lambda: _expert_case(6, 20, 25, 4, "silu", "expert", prealloc=True, seed=12),
    "experts_prealloc_token": lambda: _expert_case(6, 20, 25, 4, "gelu_tanh", "token", prealloc=True, seed=12),
    "experts_duplicate_ids_expert": lambda: _expert_case(6, 16, 4, 6, "silu", "expert", dups=True, seed=13),
    "experts_many_tiles_expert": lambda: _expert_case(70, 16, 49, 8, "silu", "expert", seed=14),
    # MANY_TOKENS tokens: the token-centric kernel's throughput config (8 rows of d = 512 per step: 3 steps).
    "experts_many_tokens_token": lambda: _expert_case(256, 512, 49, 20, "silu", "token", seed=15),
    "experts_many_tokens_hybrid": lambda: _expert_case(256, 512, 49, 20, "gelu", "hybrid", prealloc=True, seed=16),
    **{f"gated_mlp_{act}": (lambda a=act: _gated_mlp_case(a, seed=23)) for act in ACTS},
    "gated_mlp_t1": lambda: _gated_mlp_case("silu", T=1, inter=8, seed=24),
    "layer_product_silu": lambda: _layer_case("product", "silu"),
    "layer_softmax_gelu": lambda: _layer_case("softmax", "gelu"),
    "layer_no_norm_gelu_tanh": lambda: _layer_case("product", "gelu_tanh", router_norm="none"),
    "layer_no_shared_relu": lambda: _layer_case("softmax", "relu", inter=0),
    "layer_decode_t1": lambda: _layer_case("product", "silu", T=1),
    "layer_fp16_fused_shared_mlp": lambda: _layer_case("product", "silu", T=12, inter=24, dtype=torch.float16),
    "layer_grad_enabled_fused_path": lambda: _layer_case("product", "gelu", grad=True),
    "layer_expert_centric_fast_path": lambda: _layer_case("softmax", "silu", T=70, K=6),  # 70*6 >= 20*16
    "layer_large_k_fast_path": lambda: _layer_case("product", "silu", T=6, K=70, N=100, inter=8),  # K > 64: unfused tail
    "layer_dense_fast_path": _layer_dense_case,
    **{f"experts_dense_{act}": (lambda a=act: _dense_case(7, 24, 36, 5, a, seed=20)) for act in ACTS},
    "layer_dense_rule_fast_path": _layer_dense_rule_case,
    **{f"dense_rule_{act}": (lambda a=act: _dense_rule_case(9, 12, 70, a, seed=43)) for act in ACTS},
    "dense_rule_chunked_k_eq_n": lambda: _dense_rule_case(7, 16, 256, "silu", chunk_rows=3, seed=44),
    "dense_rule_ties": lambda: _dense_rule_case(6, 9, 70, "silu", ties=True, seed=46),
    "dense_rule_no_prefetch_tall_tile": lambda: _dense_rule_case(
        4, 20, 90, "silu", seed=47, meta=_rule_meta(rows=32, cols=16, prefetch=False)),
    "dense_rule_fp16_ragged": lambda: _dense_rule_case(5, 47, 300, "gelu", d=24, dtype=torch.float16, seed=45),
    "experts_dense_k_eq_n_chunked": lambda: _dense_case(5, 16, 9, 9, "silu", chunk_rows=2, seed=21),
    "experts_dense_t1": lambda: _dense_case(1, 16, 25, 3, "gelu", seed=22),
    "router_logits_norm_product": lambda: _router_logits_case(5, 8, 16, "product"),
    "router_logits_no_norm_softmax": lambda: _router_logits_case(4, 6, 1, "softmax", norm=False, seed=1),
    "router_logits_k_eq_n": lambda: _router_logits_case(3, 5, 25, "softmax", seed=2),
    "router_logits_k_gt_s_prealloc": lambda: _router_logits_case(2, 16, 40, "product", prealloc=True, seed=3),
    "router_logits_t0": lambda: _router_logits_case(0, 6, 4, "product"),
    "router_logits_bad_inputs": _router_logits_bad_inputs_case,
}


@pytest.fixture(scope="module")
def interp_results():
    return interpret(__file__)


@pytest.mark.parametrize("case", list(INTERP_CASES))
def test_interpreter(case, interp_results):
    assert interp_results[case] == "ok", interp_results[case]


def test_schedule_choice():
    from omnimoe.kernels import use_expert_centric

    assert not use_expert_centric(4096, 16, 1 << 20)  # n1m: ~0.06 tokens per expert
    assert not use_expert_centric(64, 16, 4096)  # decode
    assert not use_expert_centric(4096, 16, 4096)  # readme: token-centric measured faster
    assert use_expert_centric(4096, 512, 102400)  # paper configs: ~20 tokens per expert
    from omnimoe.kernels.experts import use_dense

    assert not use_dense(4096, 512, 102400) and not use_dense(4096, 2048, 102400) and use_dense(4096, 4096, 102400)
    assert not use_dense(4096, 16, 4096) and not use_dense(64, 4096, 102400)
    # Dense from the router's rule: product gates and K above the small-K router (paper_k4096).
    from omnimoe.kernels.dense_rule import rule_applies

    assert rule_applies(4096, "product") and rule_applies(65, "product")
    assert not rule_applies(64, "product") and not rule_applies(4096, "softmax")


def test_cpu_tensors_need_interpreter_or_cuda():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("interpreter mode accepts CPU tensors by design")
    from omnimoe.kernels import product_key_topk_triton

    px = torch.log_softmax(torch.randn(2, 4), -1)
    with pytest.raises(OmniMoEInputError):
        product_key_topk_triton(px, px, 3, "product")


# ----------------------------------------------------------------------------------- GPU tests
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("s,K,gate", [
    (64, 16, "product"), (64, 4096, "softmax"), (320, 512, "product"),
    (320, 2048, "softmax"), (1024, 16, "softmax"), (1024, 4096, "product"),
])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_router(s, K, gate):
    from omnimoe.kernels import product_key_topk_triton

    gen = torch.Generator().manual_seed(s * 7 + K)
    px, py = _rand_log_probs(300, s, gen, device="cuda")
    gr, ir = ops.product_key_topk_reference(px, py, K, gate)
    for sort in (True, False):  # sort=False: the layer's unordered routed sum
        g, i = product_key_topk_triton(px, py, K, gate, sort=sort)
        if not sort:
            g, i = _reference_order(px, py, g, i)
        assert_topk_matches(px.cpu(), py.cpu(), K, gate, g.cpu(), i.cpu(), gr.cpu(), ir.cpu())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_router_ties():
    from omnimoe.kernels import product_key_topk_triton

    gen = torch.Generator().manual_seed(3)
    px, py = _rand_log_probs(64, 32, gen, ties=True, device="cuda")
    for K, gate in ((10, "product"), (100, "softmax")):
        g, i = product_key_topk_triton(px, py, K, gate)
        gr, ir = ops.product_key_topk_reference(px, py, K, gate)
        assert_topk_matches(px.cpu(), py.cpu(), K, gate, g.cpu(), i.cpu(), gr.cpu(), ir.cpu())


@pytest.mark.parametrize("T,d,N,K", [(513, 1024, 4096, 16), (300, 256, 16384, 64), (200, 96, 400, 400)])
@pytest.mark.parametrize("schedule", ["token", "expert", "hybrid"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_experts(T, d, N, K, schedule):
    from omnimoe.kernels import expert_grouped_matmul_triton

    gen = torch.Generator().manual_seed(T + N)
    x, up, down, g, idx = _expert_inputs(T, d, N, K, gen, device="cuda", dups=N > 100000)
    # Every activation once (each is its own compile); fp16 on one shape.
    for act in ACTS if d == 96 else ("silu",):
        y = expert_grouped_matmul_triton(x, up, down, g, idx, act, schedule=schedule)
        assert rel_err(y, ops.expert_grouped_matmul_reference(x, up, down, g, idx, act)) <= 1e-5
    for dt in (torch.float16,) if d == 96 else (torch.bfloat16,):
        xb, ub, db = x.to(dt), up.to(dt), down.to(dt)
        y = expert_grouped_matmul_triton(xb, ub, db, g, idx, "silu", schedule=schedule)
        yr = ops.expert_grouped_matmul_reference(xb, ub, db, g, idx, "silu")
        assert y.dtype == dt and rel_err(y, yr) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_empty_tokens():
    from omnimoe.kernels import expert_grouped_matmul_triton, product_key_topk_triton

    px = torch.empty(0, 16, device="cuda")
    g, i = product_key_topk_triton(px, px, 20, "softmax")
    assert g.shape == (0, 20) and i.shape == (0, 20)
    up = torch.randn(256, 32, device="cuda", dtype=torch.bfloat16)
    for sch in ("token", "expert", "hybrid"):
        y = expert_grouped_matmul_triton(torch.empty(0, 32, device="cuda", dtype=torch.bfloat16), up, up, g, i, "silu", schedule=sch)
        assert y.shape == (0, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_prealloc_launch_allocates_nothing_and_captures():
    """The plugin contract: with outputs + workspace, no allocation and no host sync (capturable)."""
    from omnimoe.kernels import (expert_grouped_matmul_triton, expert_workspace_bytes, product_key_topk_triton,
                                 topk_workspace_bytes)

    T, s, K, d = 256, 64, 32, 128
    N = s * s
    gen = torch.Generator().manual_seed(5)
    px, py = _rand_log_probs(T, s, gen, device="cuda")
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    up = torch.randn(N, d, device="cuda", dtype=torch.bfloat16) * d**-0.5
    down = torch.randn(N, d, device="cuda", dtype=torch.bfloat16) * d**-0.5
    gates = torch.empty(T, K, device="cuda")
    idx = torch.empty(T, K, device="cuda", dtype=torch.int32)
    y = torch.empty(T, d, device="cuda", dtype=torch.bfloat16)
    ws = torch.empty(max(topk_workspace_bytes(T, s, K), expert_workspace_bytes(T, K, N, d)), device="cuda", dtype=torch.uint8)

    def run(schedule):
        product_key_topk_triton(px, py, K, "product", gates_out=gates, indices_out=idx, workspace=ws)
        expert_grouped_matmul_triton(x, up, down, gates, idx, "silu", out=y, workspace=ws, schedule=schedule)

    for schedule in ("token", "expert", "hybrid"):
        run(schedule)  # compile
        torch.cuda.synchronize()
        before = torch.cuda.memory_stats()["allocation.all.allocated"]
        run(schedule)
        torch.cuda.synchronize()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
        y_eager = y.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # a host sync or .item() inside would raise here
            run(schedule)
        y.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y, y_eager) <= 1e-2
        gr, ir = ops.product_key_topk_reference(px, py, K, "product")
        assert torch.equal(idx, ir)
        assert rel_err(y, ops.expert_grouped_matmul_reference(x, up, down, gr, ir, "silu")) <= 1e-2


@pytest.mark.parametrize("s,K,dtype", [(1024, 16, torch.bfloat16), (64, 64, torch.float32), (320, 1, torch.bfloat16)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_router_logits_fused(s, K, dtype):
    for norm, gate in ((True, "product"), (False, "softmax")):
        _router_logits_case(300, s, K, gate, norm=norm, dtype=dtype, seed=s + K, device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dense_schedule():
    _dense_case(300, 256, 4096, 64, "silu", device="cuda")
    _dense_case(300, 256, 4096, 64, "gelu", dtype=torch.bfloat16, chunk_rows=128, seed=1, device="cuda")
    _dense_case(7, 96, 400, 400, "relu", dtype=torch.float16, seed=2, device="cuda")
    for dtype, act in ((torch.bfloat16, "silu"), (torch.float16, "gelu")):
        _dense_rule_case(300, 64, 1024, act, d=256, dtype=dtype, seed=3, device="cuda")
    _dense_rule_case(130, 320, 4096, "silu", d=128, chunk_rows=64, dtype=torch.bfloat16, seed=4, device="cuda")
    _dense_rule_case(40, 50, 700, "silu", d=64, dtype=torch.bfloat16, ties=True, seed=5, device="cuda")
    # The fast activations (inline PTX, GPU only) against the plain ones, both rule-pass loops.
    for act in ("silu", "gelu_tanh"):
        for prefetch in (True, False):
            _dense_rule_case(64, 48, 300, act, d=64, seed=6, device="cuda", meta=_rule_meta(prefetch=prefetch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_token_centric_fast_matches_public_launcher():
    """The layer's unchecked token-centric launch gives what the public launcher gives, also on a
    misaligned view (another Triton specialisation)."""
    from omnimoe.kernels import expert_grouped_matmul_triton
    from omnimoe.kernels import experts as ke

    T, d, N, K = 5, 256, 4096, 16
    gen = torch.Generator().manual_seed(17)
    x, up, down, g, idx = _expert_inputs(T + 1, d, N, K, gen, device="cuda")
    x, up, down = x.to(torch.bfloat16), up.to(torch.bfloat16), down.to(torch.bfloat16)
    g, idx = g[:T].contiguous(), idx[:T].contiguous()
    for off in (0, 1, 0):
        xs = x.view(-1)[off : off + T * d].view(T, d)
        y = torch.full((T, d), float("nan"), device="cuda", dtype=torch.bfloat16)
        ke.token_centric_fast(xs, up, down, g, idx, y, ke.ACT_IDS["silu"])
        assert torch.equal(y, expert_grouped_matmul_triton(xs, up, down, g, idx, "silu", schedule="token"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_cuda_graphs_follow_inputs_weights_and_streams():
    """Small-T inference replays per-T CUDA graphs: same result as launching, on new inputs, after
    in-place weight updates (same addresses), after router weight updates (the cached router
    weights are rebuilt elsewhere: re-capture), after a parameter is replaced, from another stream."""
    import copy

    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    torch.manual_seed(1)
    cfg = OmniMoEConfig(hidden_size=128, intermediate_size=256, num_experts=4096, top_k=16)
    layer = OmniMoELayer(cfg, backend="triton", device="cuda", dtype=torch.bfloat16).eval()
    ref = copy.deepcopy(layer)
    ref.decode_cuda_graphs = False

    def check(T):
        x = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16)
        y, yr = layer(x), ref(x)
        assert rel_err(y, yr) <= 1e-3, (T, rel_err(y, yr))
        return y

    with torch.inference_mode():
        for T in (1, 3, 1, 64, 3):
            check(T)
        assert set(k[0] for k in layer._cuda_graphs) == {1, 3, 64}
        y1 = check(1)
        assert y1.data_ptr() != check(1).data_ptr()  # outputs are copies, not the graph's buffer
        for m in (layer, ref):
            m.down_embed.weight.mul_(2)  # in place: same addresses
            m.router_gate_x.weight.add_(0.05)  # router cache rebuilt
        check(1)
        for m in (layer, ref):
            m.up_proj.weight = torch.nn.Parameter(m.up_proj.weight * 0.5)  # replaced
        check(1)
        other = torch.cuda.Stream()
        with torch.cuda.stream(other):
            check(1)
        check(1)
        copy.deepcopy(layer)  # graphs are not copied
        # Parameters made under inference_mode track no version: no graphs, plain launches.
        frozen = OmniMoELayer(cfg, backend="triton", device="cuda", dtype=torch.bfloat16).eval()
        frozen.load_state_dict(layer.state_dict())
        x = torch.randn(2, 128, device="cuda", dtype=torch.bfloat16)
        assert rel_err(frozen(x), layer(x)) <= 1e-3 and not frozen.__dict__.get("_cuda_graphs")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_repeat_graphs_only_for_repeated_token_counts():
    """Above the decode sizes a token count gets a CUDA graph only on its second call in a row,
    replays it while it exists (same result as launching), and at most two such graphs stay."""
    import copy

    from omnimoe import layer as layer_mod
    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    torch.manual_seed(2)
    cfg = OmniMoEConfig(hidden_size=128, intermediate_size=256, num_experts=4096, top_k=16)
    layer = OmniMoELayer(cfg, backend="triton", device="cuda", dtype=torch.bfloat16).eval()
    ref = copy.deepcopy(layer)
    ref.repeat_cuda_graphs = False

    def repeats():
        return [k[0] for k in layer.__dict__.get("_cuda_graphs", {}) if k[0] > layer_mod._GRAPH_MAX_TOKENS]

    def check(T):
        x = torch.randn(T, 128, device="cuda", dtype=torch.bfloat16)
        y, yr = layer(x), ref(x)
        assert rel_err(y, yr) <= 1e-3, (T, rel_err(y, yr))

    with torch.inference_mode():
        for T in (300, 500, 300, 500):
            check(T)  # never twice in a row: launched
        assert repeats() == []
        check(300)
        check(300)
        assert repeats() == [300]
        check(500)
        check(300)  # kept: replayed although not repeated
        assert repeats() == [300]
        for T in (500, 500, 700, 700):
            check(T)
        assert repeats() == [500, 700]  # 300, the oldest, was dropped
        check(layer_mod._REPEAT_GRAPH_MAX_TOKENS + 1)
        check(layer_mod._REPEAT_GRAPH_MAX_TOKENS + 1)
        assert repeats() == [500, 700]
        assert not ref.__dict__.get("_cuda_graphs")


@pytest.mark.parametrize("name", ["beside_small_router", "beside_large_router"])
def test_gated_mlp_kernel_compiles_for_sm90(name):
    # The interpreter misses code-generator errors; TMA descriptors, wgmma and the tile counter's
    # while loop must compile for the H200, with no GPU needed.
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnimoe.kernels import swiglu

    c = swiglu.GATED_MLP_CONFIGS[name]
    bm, bn, bk = c["BM"], c["BN"], c["BK"]
    sig = {"x_desc": f"tensordesc<bf16[{bm},{bk}]>", "wg_desc": f"tensordesc<bf16[{bn},{bk}]>",
           "wu_desc": f"tensordesc<bf16[{bn},{bk}]>", "h_desc": f"tensordesc<bf16[{bm},{bn}]>",
           "next_tile_ptr": "*i32", "M": "i32", "N": "i32", "K": "i32",
           **{k: "constexpr" for k in ("ACT", "BM", "BN", "BK", "GROUP_M")}}
    src = ASTSource(fn=swiglu._gated_mlp_kernel, signature=sig,
                    constexprs=dict(ACT=0, BM=bm, BN=bn, BK=bk, GROUP_M=c["GROUP_M"]))
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
    assert "wgmma" in compiled.asm["ptx"] and compiled.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("side", [256, 1024])  # both launch configs (swiglu.gated_mlp_config)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 300, 4096])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_gated_mlp_rounds_once(T, dtype, side):
    # The fused gate/up GEMM keeps both products in fp32 until h: closer to fp32 than two GEMMs
    # whose outputs are rounded before the gated activation (about half the error, measured).
    import torch.nn.functional as F

    from omnimoe.kernels import swiglu

    torch.manual_seed(0)
    d, inter = 1024, 1024
    x = torch.randn(T, d, device="cuda").to(dtype)
    wg, wu = ((torch.randn(inter, d, device="cuda") * d**-0.5).to(dtype) for _ in range(2))
    ref = F.silu(x.float() @ wg.float().t()) * (x.float() @ wu.float().t())
    fused = swiglu.gated_mlp_fast(x, wg, wu, 0, swiglu.gated_mlp_config(side))
    two_gemms = swiglu.gated_act_fast(F.linear(x, wg), F.linear(x, wu), 0)
    assert swiglu.gated_mlp_fusable(x, wg, wu)
    assert rel_err(fused.float(), ref) <= 0.75 * rel_err(two_gemms.float(), ref), (rel_err(fused.float(), ref), rel_err(two_gemms.float(), ref))


# (16384, 512, 256) and (16384, 1024, 512): the dense schedule, with either gate.
# (102400, 512, 4096, "product") and (6561, 200, 700, "product"): grid lines from the router's rule
# (grid_row.rule_launch); (6561, 200, 700, "softmax"): grid lines from the pair list.
@pytest.mark.parametrize("N,K,T,gate", [(4096, 16, 1024, "softmax"), (16384, 512, 256, "softmax"),
                                        (16384, 1024, 512, "product"), (1 << 20, 16, 8, "softmax"),
                                        (1 << 20, 16, 1, "softmax"), (102400, 512, 4096, "product"),
                                        (6561, 200, 700, "product"), (6561, 200, 700, "softmax")])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_layer_matches_reference_and_graph_replays(N, K, T, gate):
    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    torch.manual_seed(0)
    cfg = OmniMoEConfig(hidden_size=256, intermediate_size=512, num_experts=N, top_k=K, gate=gate)
    layer = OmniMoELayer(cfg, backend="triton", device="cuda", dtype=torch.bfloat16).eval()
    x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    from omnimoe.kernels.experts import use_dense

    takes_rule = layer._grid_from_rule(x) and not use_dense(T, K, N)
    assert takes_rule == (N == 102400 or (N == 6561 and gate == "product"))
    with torch.inference_mode():
        y = layer(x)
        _, i_tri = layer.route(x)
        layer.backend = "reference"
        yr = layer(x)
        px, py = layer.router_log_probs(x)
        _, i_ref = layer.route(x)
        layer.backend = "triton"
        # Both top-Ks are exact, on log-probs equal up to rounding: for K <= 64 the fused router tail
        # computes its own log-softmax, whose last bits differ from torch's, and bf16 logits make
        # exact score ties across axes common, so ~0.5% of tokens (H200, N=4096) swap a tied expert.
        # Only near-ties may differ.
        differs, near = ops.routing_near_ties(px, py, i_ref, i_tri, 1e-4)
        assert not (differs & ~near).any() and differs.float().mean() <= 0.02
        agree = ~differs
        assert rel_err(y[agree], yr[agree]) <= 1e-2
        # Whole-layer CUDA graph: capture once, replay on new data in the captured input buffer.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            layer(x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = layer(x)
        x2 = torch.randn_like(x)
        x.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(y_static, layer(x2)) <= 1e-3


if __name__ == "__main__" and "--interpret" in sys.argv:
    report(run_cases(INTERP_CASES))


class _RecordingKernel:
    """Stands in for a @triton.jit kernel: records the launch's meta-parameters, launches nothing."""

    def __init__(self):
        self.metas = []

    def __getitem__(self, grid):
        return lambda *args, **meta: self.metas.append(meta)


def test_many_tokens_launch_configs(monkeypatch):
    """From MANY_TOKENS tokens per launch the layer's small-K router tail and the token-centric
    kernel take their throughput configs; fewer tokens (decode) keep the latency ones."""
    from omnimoe.kernels import experts as ke
    from omnimoe.kernels import router as kr
    from omnimoe.kernels._launch import MANY_TOKENS

    few, many = ke.token_centric_config(1024, 16, 0, False), ke.token_centric_config(1024, 16, 0, False, True)
    assert (few["BLOCK_K"], few["num_warps"]) == (16, 8) and (many["BLOCK_K"], many["num_warps"]) == (4, 4)
    assert kr.router_logits_kernel_config(1024, 16, "product", True)["num_warps"] == 4
    assert kr.router_logits_kernel_config(1024, 16, "product", True, True)["num_warps"] == 1
    assert kr.router_logits_kernel_config(320, 64, "product", True, True)["num_warps"] == 4  # ka > 16: unchanged
    token, tail = _RecordingKernel(), _RecordingKernel()
    monkeypatch.setattr(ke, "_token_centric_kernel", token)
    monkeypatch.setattr(kr, "_router_logits_topk_small_kernel", tail)
    d, N, K = 1024, 64, 16
    up = torch.zeros(N, d)
    for T in (MANY_TOKENS - 1, MANY_TOKENS):
        x, g, i = torch.zeros(T, d), torch.zeros(T, K), torch.zeros(T, K, dtype=torch.int32)
        ke.token_centric_fast(x, up, up, g, i, torch.empty_like(x), 0)
        ke._launch_token_centric(x, up, up, g, i, torch.empty_like(x), d, K, N, 0, h_given=True)
        kr._router_logits_topk_launch(torch.zeros(T, 2 * 1024), None, None, 1024, K, "product", g, i)
    assert [(m["BLOCK_K"], m["num_warps"]) for m in token.metas] == [(16, 8), (16, 8), (4, 4), (4, 4)]
    assert [m["num_warps"] for m in tail.metas] == [4, 1]


def test_dense_rule_kernels_compile_for_sm90():
    # The rule pass (16-byte vector loads and stores of S / H at s = 320) and the threshold router
    # at the paper's K = 4096, through triton's code generator (the interpreter misses its errors).
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from omnimoe.kernels import dense_rule, router

    meta = dense_rule.rule_pass_config()
    warps = meta.pop("num_warps")
    sig = {"h_ptr": "*bf16", "lp_ptr": "*fp32", "theta_ptr": "*i32", "estar_ptr": "*i32", "s": "i32",
           "stride_lp": "i32", "ACT": "constexpr", **{k: "constexpr" for k in meta}}
    div16 = [["tt.divisibility", 16]]
    attrs = {(0,): div16, (1,): div16, (4,): div16, (5,): div16}  # what launches with s = 320 specialise to
    src = ASTSource(fn=dense_rule._dense_rule_kernel, signature=sig, constexprs=dict(ACT=0, **meta), attrs=attrs)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm["ptx"]
    assert "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx and "ld.global.b16" not in ptx
    meta = router.threshold_kernel_config(320, 4096)
    warps = meta.pop("num_warps")
    sig = {"px_ptr": "*fp32", "py_ptr": "*fp32", "theta_ptr": "*i32", "estar_ptr": "*i32", "wsf_ptr": "*fp32",
           "wsi_ptr": "*i32", **{k: "i32" for k in ("s", "K", "KA", "stride_px", "stride_py")},
           **{k: "constexpr" for k in meta}}
    src = ASTSource(fn=router._product_key_threshold_kernel, signature=sig, constexprs=meta)
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps)).asm["cubin"]


def test_every_kernel_compiles_for_sm90():
    """triton's code generator (not the interpreter, which runs the kernels as Python) accepts every
    kernel as launched: the native library's specs of large- and small-K routers and of the grid
    schedule in bf16 and fp32, plus the layer-only throughput configs; compiled for sm_90 here,
    without a GPU. (A loop variable rebound to another type passed the interpreter and failed here.)"""
    from trt_plugins.native import aot

    from omnimoe.kernels import experts as ke
    from omnimoe.kernels import router as kr

    variants = [aot.TopKVariant(320, 512, "product"), aot.TopKVariant(320, 4096, "softmax"),
                aot.TopKVariant(1024, 16, "product"), aot.ExpertsVariant(1024, 102400, 512, "bf16", "silu"),
                aot.ExpertsVariant(64, 102400, 4096, "fp32", "gelu")]
    specs = {}
    for v in variants:
        for spec in aot.kernel_specs(v):
            specs.setdefault((spec.fn.__name__, repr(spec.signature()), spec.num_warps), spec)
    consts, warps, stages = aot._split_meta(ke.token_centric_config(1024, 16, 0, False, True))
    token = next(s for s in aot.kernel_specs(variants[3]) if s.role == "token")
    specs["token_many"] = aot.KernelSpec("token", token.fn, token.pointer_types, token.known_ints, consts, warps, stages)
    for s, many in ((1024, True), (1024, False), (64, True)):
        consts, warps, stages = aot._split_meta(kr.router_logits_kernel_config(s, 16, "product", True, many))
        ptrs = (("logits_ptr", "bf16"), ("scale_ptr", "fp32"), ("shift_ptr", "fp32"), ("gates_ptr", "fp32"),
                ("idx_ptr", "i32"))
        specs[("tail", s, many)] = aot.KernelSpec("tail", kr._router_logits_topk_small_kernel, ptrs, (("s", s),),
                                                  consts, warps, stages)
    failures = []
    for key, spec in specs.items():
        try:
            image = aot._compile_one(spec, 90)
            assert image.data and image.num_warps == spec.num_warps
        except Exception as e:  # noqa: BLE001 - collect every failing kernel
            failures.append(f"{spec.fn.__name__}: {str(e).splitlines()[0][:200]}")
    assert not failures, failures
    assert len(specs) >= 20
