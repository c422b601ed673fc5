"""Launch helpers shared by the router and expert launchers: workspace carving and checks.

Launchers must be callable from a TensorRT plugin's `enqueue` (raw pointers wrapped as tensors,
a caller-provided workspace, the caller's stream), so everything here is allocation-free when a
workspace is given and never reads device memory on the host.
"""
from __future__ import annotations

import os

import torch

from ..errors import OmniMoEInputError

# Byte alignment of every buffer carved out of a workspace (vector loads, TMA-friendly).
ALIGN = 256
# From this many tokens a launch of one program per token fills the GPU: the router's small-K
# kernel and the token-centric kernel take their throughput configs (more programs resident, fewer
# warps or rows each); fewer tokens (decode) keep the configs that shorten one token's latency.
MANY_TOKENS = 256


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(*tensors: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors only inside the Triton interpreter."""
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise OmniMoEInputError(f"all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not interpreting():
        raise OmniMoEInputError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {dev}")


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Carver:
    """Hands out aligned, typed views of one flat uint8 workspace (or allocates when none given)."""

    def __init__(self, workspace: torch.Tensor | None, need_bytes: int, device: torch.device):
        if workspace is None:
            # Allowed outside enqueue: the torch caching allocator is capture-safe.
            workspace = torch.empty(max(need_bytes, 1), dtype=torch.uint8, device=device)
        else:
            if workspace.dtype != torch.uint8 or workspace.dim() != 1 or not workspace.is_contiguous():
                raise OmniMoEInputError("workspace must be a flat, contiguous uint8 tensor")
            if workspace.device != device:
                raise OmniMoEInputError(f"workspace is on {workspace.device}, inputs on {device}")
            if workspace.numel() < need_bytes:
                raise OmniMoEInputError(f"workspace has {workspace.numel()} bytes, needs {need_bytes}")
            if workspace.data_ptr() % 16:
                raise OmniMoEInputError("workspace must be 16-byte aligned")
        self.buf = workspace
        self.pos = 0

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        view = self.buf[self.pos : self.pos + nbytes].view(dtype)
        self.pos += align(nbytes)
        return view


def check_out(out: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device, name: str) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device or not out.is_contiguous():
        raise OmniMoEInputError(
            f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())

