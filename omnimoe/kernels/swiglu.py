"""The shared MLP's act(gate) * up (SwiGLU product) in one launch, for `backend="triton"` inference.

Eager torch runs the activation and the product as two kernels over [T, I] and rounds twice; this
reads gate and up once, writes once, and rounds once. The exported ONNX keeps standard ops
(SPEC §3), which TensorRT and ONNX Runtime fuse themselves.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..errors import OmniMoEInputError
from ._launch import check_device, interpreting
from .experts import ACT_IDS, _act


@triton.jit
def _gated_act_kernel(g_ptr, u_ptr, out_ptr, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(g_ptr + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (_act(g, ACT) * u).to(out_ptr.dtype.element_ty), mask=m)


def gated_act_triton(gate: torch.Tensor, up: torch.Tensor, activation_name: str) -> torch.Tensor:
    """act(gate) * up elementwise (the SwiGLU product), one launch; result in gate's dtype.

    Rounds once, where eager torch rounds act(gate) and the product separately."""
    check_device(gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise OmniMoEInputError(f"gate and up must match, got {gate.dtype} {tuple(gate.shape)} and {up.dtype} {tuple(up.shape)}")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 2048
        _gated_act_kernel[(triton.cdiv(n, block),)](gate, up, out, n, ACT=ACT_IDS[activation_name], BLOCK=block)
    return out


_GATED_ACT_BLOCK = 2048


def gated_act_fast(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    """Unchecked `gated_act_triton` (layer inference hot path): gate and up contiguous, same
    shape and dtype, on the kernel's device; act = ACT_IDS[name]."""
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _gated_act_kernel[(triton.cdiv(n, _GATED_ACT_BLOCK),)](gate, up, out, n, ACT=act, BLOCK=_GATED_ACT_BLOCK)
    return out


# ----------------------------------------------------------------------------- fused gate/up GEMM
@triton.jit
def _tile_of(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program pid, GROUP_M row tiles side by side so weight tiles stay in L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def _gated_mlp_kernel(x_desc, wg_desc, wu_desc, h_desc, next_tile_ptr, M, N, K,
                      ACT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """h = act(x Wg^T) * (x Wu^T) for x [M, K], Wg/Wu [N, K] (TMA descriptors; tiles past the
    edges read zeros and their stores are clipped). Both products accumulate in fp32 and h is
    rounded once, where two GEMMs round gate and up to the model dtype first.

    Each program takes tiles from a counter (int32, zero at launch) until none are left: with fewer
    programs than tiles, a program that starts late, on an SM still busy with other kernels, takes
    fewer tiles instead of delaying the launch's end."""
    tiles = tl.cdiv(M, BM) * tl.cdiv(N, BN)
    tile = tl.atomic_add(next_tile_ptr, 1)
    while tile < tiles:
        pid_m, pid_n = _tile_of(tile, M, N, BM, BN, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        acc_g = tl.zeros([BM, BN], dtype=tl.float32)
        acc_u = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            a = x_desc.load([om, k0])
            acc_g = tl.dot(a, wg_desc.load([on, k0]).T, acc_g)
            acc_u = tl.dot(a, wu_desc.load([on, k0]).T, acc_u)
        h = _act(acc_g, ACT) * acc_u
        h_desc.store([om, on], h.to(h_desc.dtype))
        tile = tl.atomic_add(next_tile_ptr, 1)


# Launch configs of _gated_mlp_kernel, by what runs beside it. The layer's routed path runs on a
# side stream; the two only overlap when the GEMM leaves room on the SMs. programs_per_sm: 0 = one
# program per tile; > 0 = that many programs per SM, each taking tiles until none are left.
# H200, bf16, d = 1024, I = 4096, T = 4096, whole-layer CUDA graph (scripts/sweep_layer_overlap.py):
# one 128 x 128 program (8 warps) per SM: readme / n65k / n1m 199 / 232 / 308 us; one 64 x 128
# program (4 warps, fewer registers, so the router's one-warp programs fit beside it) per SM:
# 231 / 248 / 292 us; one program per tile: 233 / 279 / 348 (128 x 128), 229 / 274 / 345
# (128 x 64). Alone (scripts/bench_shared_mlp.py) the kernel takes 122 us at 64 x 128, two cuBLAS
# GEMMs + the gated-act kernel 126 us.
GATED_MLP_CONFIGS = {
    "beside_small_router": dict(BM=128, BN=128, BK=64, GROUP_M=16, num_warps=8, num_stages=3, programs_per_sm=1),
    "beside_large_router": dict(BM=64, BN=128, BK=64, GROUP_M=16, num_warps=4, num_stages=4, programs_per_sm=1),
}
# Router grid side from which the router tail (one warp per token, K <= 64) is long enough to want
# room beside the GEMM: measured at s = 64 and 256 (small) and 1024 (large).
LARGE_ROUTER_SIDE = 512


def gated_mlp_config(grid_side: int) -> dict:
    """`gated_mlp_fast`'s launch config for a layer whose router has this grid side."""
    return GATED_MLP_CONFIGS["beside_large_router" if grid_side >= LARGE_ROUTER_SIDE else "beside_small_router"]


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    # The CPU interpreter counts as one SM: one program then loops over every tile.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def gated_mlp_fusable(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> bool:
    """Whether `gated_mlp_fast` takes these: 16-bit floats (fp32 would run its products in TF32),
    one dtype, contiguous, and TMA's 16-byte alignment of bases and rows."""
    if x.dtype == torch.bfloat16 and interpreting():
        return False  # Triton's CPU interpreter (3.9) reads bf16 descriptor tiles as garbage
    return (x.dtype in (torch.bfloat16, torch.float16) and w_gate.dtype == x.dtype == w_up.dtype
            and x.dim() == 2 and w_gate.shape == w_up.shape and x.shape[1] == w_gate.shape[1]
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in (x, w_gate, w_up))
            and x.shape[1] % 8 == 0 and w_gate.shape[0] % 8 == 0)


def gated_mlp_fast(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, act: int, config: dict) -> torch.Tensor:
    """act(x w_gate^T) * (x w_up^T) -> [T, I] in x's dtype, one launch (layer inference hot path;
    unchecked: the caller has asked `gated_mlp_fusable`). act = ACT_IDS[name]; config: one of
    GATED_MLP_CONFIGS (`gated_mlp_config`)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    T, d = x.shape
    inter = w_gate.shape[0]
    h = torch.empty((T, inter), dtype=x.dtype, device=x.device)
    if T == 0:
        return h
    c = dict(config)
    per_sm = c.pop("programs_per_sm")
    bm, bn, bk = c["BM"], c["BN"], c["BK"]
    tiles = triton.cdiv(T, bm) * triton.cdiv(inter, bn)
    grid = (tiles if not per_sm else min(tiles, max(1, round(per_sm * _sm_count(x.device)))),)
    next_tile = torch.zeros(1, dtype=torch.int32, device=x.device)  # one per call: launches may overlap
    _gated_mlp_kernel[grid](
        TensorDescriptor.from_tensor(x, [bm, bk]), TensorDescriptor.from_tensor(w_gate, [bn, bk]),
        TensorDescriptor.from_tensor(w_up, [bn, bk]), TensorDescriptor.from_tensor(h, [bm, bn]),
        next_tile, T, inter, d, ACT=act, **c)
    return h
