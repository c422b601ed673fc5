"""Baselines the benchmark measures next to the Triton path (scripts/bench_layer.py).

- `dense_mlp_forward`: the layer's shared SwiGLU MLP alone (what a dense layer of that width costs).
- `peer_forward`: a PEER-style token-centric layer in plain PyTorch: the same product-key router
  (per-axis torch.topk, then torch.topk over the k x k candidate sums), then a per-token gather of
  the K up/down expert vectors and two batched contractions in the model dtype. This is what a
  straightforward PyTorch implementation of PEER / OmniMoE does.
"""
from __future__ import annotations

import torch

from . import ops
from .layer import OmniMoELayer

# Tokens per chunk keep the gathered [t, K, d] blocks near this many elements.
_PEER_CHUNK_ELEMENTS = 1 << 28


def dense_mlp_forward(layer: OmniMoELayer, x: torch.Tensor) -> torch.Tensor:
    """Shared MLP alone: down(act(gate x) * up x)."""
    y = layer.shared_mlp(x.reshape(-1, layer.config.hidden_size))
    if y is None:
        raise ops.OmniMoEInputError("the layer has no shared MLP (intermediate_size=0)")
    return y.reshape(x.shape)


def peer_route(layer: OmniMoELayer, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEER product-key retrieval: top-k per axis, top-K of the k*k sums (torch.topk, fp32)."""
    cfg = layer.config
    s, K = cfg.grid_side, cfg.top_k
    px = layer._router_log_probs(layer.router_gate_x(x), getattr(layer, "router_norm_x", None))
    py = layer._router_log_probs(layer.router_gate_y(x), getattr(layer, "router_norm_y", None))
    k = min(K, s)
    vx, ix = px.topk(k, dim=-1)
    vy, iy = py.topk(k, dim=-1)
    cand = (vx[:, :, None] + vy[:, None, :]).flatten(1)
    scores, flat = cand.topk(K, dim=-1)
    experts = ix.gather(1, flat // k) * s + iy.gather(1, flat % k)
    return ops.gates_from_scores(scores, cfg.gate), experts


def peer_forward(layer: OmniMoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token-centric PEER-style layer: per-token gather of the K expert vectors (model dtype)."""
    cfg = layer.config
    d, K = cfg.hidden_size, cfg.top_k
    x2 = x.reshape(-1, d)
    act = ops.activation(cfg.hidden_act)
    chunk = max(1, _PEER_CHUNK_ELEMENTS // (K * d))
    outs = []
    for start in range(0, x2.shape[0], chunk):
        xc = x2[start : start + chunk]
        gates, experts = peer_route(layer, xc)
        u = torch.nn.functional.embedding(experts, layer.up_embed.weight)  # [t, K, d]
        h = act(torch.einsum("tkd,td->tk", u, xc)) * gates.to(xc.dtype)
        del u
        v = torch.nn.functional.embedding(experts, layer.down_embed.weight)
        outs.append(torch.einsum("tk,tkd->td", h, v))
    y = torch.cat(outs) if outs else x2.new_zeros((0, d))
    shared = layer.shared_mlp(x2)
    if shared is not None:
        y = y + shared
    return y.reshape(x.shape)
