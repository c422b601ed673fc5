"""Checks shared by the GPU plugin tests (Python plugins and the native library): inputs, tolerances,
and the routing comparison against the reference ops."""
from __future__ import annotations

import torch

from omnimoe.ops import product_key_topk_reference


def router_inputs(T: int, s: int, seed: int):
    g = torch.Generator(device="cuda").manual_seed(seed)
    lx = torch.log_softmax(3 * torch.randn(T, s, device="cuda", generator=g), -1)
    ly = torch.log_softmax(3 * torch.randn(T, s, device="cuda", generator=g), -1)
    return lx, ly


def assert_topk_matches_reference(gates, indices, lx, ly, top_k, gate):
    ref_g, ref_i = product_key_topk_reference(lx, ly, top_k, gate)
    # Rows whose K-th and (K+1)-th best scores are (near) tied may legitimately differ.
    s = lx.shape[1]
    if top_k < s * s:
        scores = (lx[:, :, None] + ly[:, None, :]).flatten(1).topk(top_k + 1, dim=-1).values
        clear = (scores[:, top_k - 1] - scores[:, top_k]) > 1e-5
    else:
        clear = torch.ones(lx.shape[0], dtype=torch.bool, device=lx.device)
    assert clear.float().mean() > 0.9
    got_i, got_g = indices[clear].long(), gates[clear]
    exp_i, exp_g = ref_i[clear].long(), ref_g[clear]
    # Same experts; compare gates per expert (order among exactly tied scores may differ).
    got_sorted, exp_sorted = got_i.sort(-1), exp_i.sort(-1)
    assert torch.equal(got_sorted.values, exp_sorted.values)
    torch.testing.assert_close(
        got_g.gather(1, got_sorted.indices), exp_g.gather(1, exp_sorted.indices), atol=1e-5, rtol=1e-5
    )
    # Descending score order (both gate modes are monotone in the score).
    assert bool((gates[:, :-1] >= gates[:, 1:] - 1e-6).all())


def expert_inputs(T, d, N, K, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    up = (torch.randn(N, d, device="cuda", generator=g) / d**0.5).to(dtype)
    down = torch.randn(N, d, device="cuda", generator=g).to(dtype)
    gates = torch.softmax(torch.randn(T, K, device="cuda", generator=g), -1)
    # K distinct experts per token, as a top-K yields.
    indices = torch.rand(T, N, device="cuda", generator=g).argsort(-1)[:, :K].to(torch.int32)
    return x, up, down, gates, indices


TOL = {
    torch.float32: dict(atol=2e-3, rtol=2e-3),
    torch.float16: dict(atol=1e-2, rtol=1e-2),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}
