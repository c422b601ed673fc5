"""The two OmniMoE ops: their contract (shape/dtype checks), reference math, and dispatch.

This module is the single home of each op's contract. The Triton kernels, the torch.library
custom ops, the ONNX Runtime ops and the TensorRT plugins all call `check_*` from here and are
tested against the `*_reference` functions here.

    product_key_topk(log_probs_x [T,s], log_probs_y [T,s], top_k, gate) -> gates [T,K] f32, indices [T,K] i32
    expert_grouped_matmul(x [T,d], up [N,d], down [N,d], gates [T,K], indices [T,K], activation) -> y [T,d]
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from .config import ACTIVATIONS, GATES
from .errors import OmniMoEInputError

BACKENDS = ("reference", "triton")

# Reference paths chunk over tokens so that gathered [t, K, d] / candidate [t, k, k] blocks stay
# around this many elements, whatever T is.
_REFERENCE_CHUNK_ELEMENTS = 1 << 24


def activation(name: str):
    """The elementwise activation named in the config (shared MLP and routed experts)."""
    if name == "silu":
        return F.silu
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if name == "relu":
        return F.relu
    raise OmniMoEInputError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


def check_topk_inputs(log_probs_x: torch.Tensor, log_probs_y: torch.Tensor, top_k: int, gate: str) -> tuple[int, int]:
    """Validate product_key_topk's inputs; return (T, s)."""
    if log_probs_x.dim() != 2 or log_probs_y.shape != log_probs_x.shape:
        raise OmniMoEInputError(
            f"log_probs_x and log_probs_y must both be [T, s], got {tuple(log_probs_x.shape)} and {tuple(log_probs_y.shape)}"
        )
    if log_probs_x.dtype != torch.float32 or log_probs_y.dtype != torch.float32:
        raise OmniMoEInputError(f"router log-probs must be float32, got {log_probs_x.dtype} / {log_probs_y.dtype}")
    T, s = log_probs_x.shape
    if not 1 <= top_k <= s * s:
        raise OmniMoEInputError(f"top_k must satisfy 1 <= top_k <= N={s * s}, got {top_k}")
    if gate not in GATES:
        raise OmniMoEInputError(f"gate must be one of {GATES}, got {gate!r}")
    return T, s


def check_expert_inputs(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, activation_name: str
) -> tuple[int, int, int, int]:
    """Validate expert_grouped_matmul's inputs; return (T, d, N, K)."""
    if x.dim() != 2 or up.dim() != 2 or up.shape != down.shape or up.shape[1] != x.shape[1]:
        raise OmniMoEInputError(
            f"expected x [T,d], up [N,d], down [N,d]; got {tuple(x.shape)}, {tuple(up.shape)}, {tuple(down.shape)}"
        )
    if gates.dim() != 2 or indices.shape != gates.shape or gates.shape[0] != x.shape[0]:
        raise OmniMoEInputError(
            f"expected gates [T,K] and indices [T,K] with T={x.shape[0]}; got {tuple(gates.shape)}, {tuple(indices.shape)}"
        )
    if gates.dtype != torch.float32 or indices.dtype != torch.int32:
        raise OmniMoEInputError(f"gates must be float32 and indices int32, got {gates.dtype} / {indices.dtype}")
    if activation_name not in ACTIVATIONS:
        raise OmniMoEInputError(f"activation must be one of {ACTIVATIONS}, got {activation_name!r}")
    return x.shape[0], x.shape[1], up.shape[0], gates.shape[1]


def _rank_desc_stable(scores: torch.Tensor) -> torch.Tensor:
    """Order along the last dim by score descending, smaller position first on exact ties."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def gates_from_scores(scores: torch.Tensor, gate: str) -> torch.Tensor:
    """product: exp(log P) as the upstream code trains; softmax: over the K scores (paper Eq. 2)."""
    return torch.exp(scores) if gate == "product" else torch.softmax(scores, dim=-1)


def product_key_topk_reference(
    log_probs_x: torch.Tensor, log_probs_y: torch.Tensor, top_k: int, gate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """gates [T,K] float32 and expert indices [T,K] int32 (see product_key_topk_scores)."""
    check_topk_inputs(log_probs_x, log_probs_y, top_k, gate)
    scores, indices = product_key_topk_scores(log_probs_x, log_probs_y, top_k)
    return gates_from_scores(scores, gate), indices.to(torch.int32)


def product_key_topk_scores(log_probs_x: torch.Tensor, log_probs_y: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-K scores and int64 indices of S[t, i*s+j] = px[t,i] + py[t,j], S never materialised.

    If (i, j) is in the top-K then i is in the top-K of px and j in the top-K of py (every pair
    (i', j) with i' ahead of i is ahead of (i, j)), so the top-min(K, s) of each axis and the
    top-K of their <= min(K,s)^2 sums is exact. Ties go to the smaller expert index.
    Differentiable w.r.t. the log-probs.
    """
    T, s = log_probs_x.shape
    k_axis = min(top_k, s)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // (k_axis * k_axis))
    all_scores, all_indices = [], []
    for start in range(0, T, chunk):
        px, py = log_probs_x[start : start + chunk], log_probs_y[start : start + chunk]
        ix = _rank_desc_stable(px)[:, :k_axis]
        iy = _rank_desc_stable(py)[:, :k_axis]
        cand_scores = (px.gather(1, ix)[:, :, None] + py.gather(1, iy)[:, None, :]).flatten(1)
        cand_experts = (ix[:, :, None] * s + iy[:, None, :]).flatten(1)
        # Put candidates in expert order first so the stable score sort breaks ties by expert id.
        by_expert = torch.argsort(cand_experts, dim=-1)
        cand_scores = cand_scores.gather(1, by_expert)
        cand_experts = cand_experts.gather(1, by_expert)
        best = _rank_desc_stable(cand_scores)[:, :top_k]
        all_scores.append(cand_scores.gather(1, best))
        all_indices.append(cand_experts.gather(1, best))
    if T == 0:
        return log_probs_x.new_zeros((0, top_k)), torch.zeros((0, top_k), dtype=torch.int64, device=log_probs_x.device)
    return torch.cat(all_scores), torch.cat(all_indices)


def routing_near_ties(
    log_probs_x: torch.Tensor, log_probs_y: torch.Tensor, ref_indices: torch.Tensor, run_indices: torch.Tensor, tie_tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(differs, near_tie) boolean [T]: does a run's expert set differ from the reference's, and if
    so, does every expert it picked instead score within `tie_tol` of the reference's K-th score
    (scores under the reference log-probs)? Two correct implementations whose log-probs differ by
    rounding may only disagree this way, so this is what routing parity accepts."""
    s = log_probs_x.shape[1]
    ref = ref_indices.long()
    run = run_indices.long().reshape(ref.shape)
    ref_sorted = ref.sort(dim=1).values
    differs = (ref_sorted != run.sort(dim=1).values).any(dim=1)
    if ref.shape[1] == 0:
        return differs, differs.clone()
    pos = torch.searchsorted(ref_sorted, run).clamp(max=ref.shape[1] - 1)
    shared = ref_sorted.gather(1, pos) == run
    valid = (run >= 0) & (run < s * s)
    safe = torch.where(valid, run, 0)

    def score(e: torch.Tensor) -> torch.Tensor:
        return log_probs_x.gather(1, e // s) + log_probs_y.gather(1, e % s)

    kth = score(ref).min(dim=1, keepdim=True).values
    near = shared | (valid & (kth - score(safe) <= tie_tol))
    return differs, differs & near.all(dim=1)


def expert_grouped_matmul_reference(
    x: torch.Tensor, up: torch.Tensor, down: torch.Tensor, gates: torch.Tensor, indices: torch.Tensor, activation_name: str
) -> torch.Tensor:
    """y[t] = sum_k act(<up[idx[t,k]], x[t]>) * gates[t,k] * down[idx[t,k]], fp32 accumulation.

    Token-centric gather, chunked over tokens; differentiable w.r.t. x, up, down and gates.
    """
    T, d, N, K = check_expert_inputs(x, up, down, gates, indices, activation_name)
    act = activation(activation_name)
    chunk = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, K * d))
    outs = []
    for start in range(0, T, chunk):
        idx = indices[start : start + chunk].long()
        xc = x[start : start + chunk].float()
        h = torch.einsum("tkd,td->tk", up[idx].float(), xc)
        h = act(h) * gates[start : start + chunk]
        outs.append(torch.einsum("tk,tkd->td", h, down[idx].float()).to(x.dtype))
    return torch.cat(outs) if outs else x.new_zeros((0, d))


def _exporting() -> bool:
    # torch.export / dynamo tracing: route through the custom ops so they appear as graph nodes.
    return torch.compiler.is_compiling()


def product_key_topk(
    log_probs_x: torch.Tensor, log_probs_y: torch.Tensor, top_k: int, gate: str, backend: str = "reference"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: the custom op when traced, else the chosen backend."""
    if _exporting():
        from . import custom_ops  # noqa: F401  (registers torch.ops.omnimoe)

        return torch.ops.omnimoe.product_key_topk(log_probs_x, log_probs_y, top_k, gate)
    if backend == "triton":
        from .kernels import product_key_topk_triton

        return product_key_topk_triton(log_probs_x, log_probs_y, top_k, gate)
    return product_key_topk_reference(log_probs_x, log_probs_y, top_k, gate)


def expert_grouped_matmul(
    x: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    indices: torch.Tensor,
    activation_name: str,
    backend: str = "reference",
) -> torch.Tensor:
    """Dispatch: the custom op when traced, else the chosen backend."""
    if _exporting():
        from . import custom_ops  # noqa: F401

        return torch.ops.omnimoe.expert_grouped_matmul(x, up, down, gates, indices, activation_name)
    if backend == "triton":
        from .kernels import expert_grouped_matmul_triton

        return expert_grouped_matmul_triton(x, up, down, gates, indices, activation_name)
    return expert_grouped_matmul_reference(x, up, down, gates, indices, activation_name)
