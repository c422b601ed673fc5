"""The shared MLP's act(gate) * up (SwiGLU product) in one launch, for `backend="triton"` inference.

Eager torch runs the activation and the product as two kernels over [T, I] and rounds twice; this
reads gate and up once, writes once, and rounds once. The exported ONNX keeps standard ops
(SPEC §3), which TensorRT and ONNX Runtime fuse themselves.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..errors import OmniMoEInputError
from ._launch import check_device
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
