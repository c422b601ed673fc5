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


class FastLaunch:
    """Launch one @triton.jit kernel through its compiled launcher once it has been compiled.

    `kernel[grid](...)` re-binds and re-specialises every argument and looks the compiled kernel
    up on each call; that host time dominates small (decode) forwards. Here the first call goes
    through `kernel[grid]` (compile + launch) and keeps the CompiledKernel under a key holding what
    Triton specialises on (each tensor's dtype and 16-byte alignment; each int's value == 1,
    divisibility by 16 and width; the constexprs and num_warps); later calls with the same key go
    straight to `CompiledKernel.run`, called exactly as `JITFunction.run` calls it (Triton 3.4 to
    3.9). Under TRITON_INTERPRET=1, with a launch hook installed (profilers) or on an unknown
    Triton, every call takes the ordinary path. Internal launches only: no argument checks here,
    the public launchers keep theirs.
    """

    _MAX_ENTRIES = 256

    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        try:
            from triton import knobs

            self._knobs = knobs.runtime
            # Positional order of bound arguments = the kernel's parameter order.
            self._arg_names = list(fn.arg_names)
        except (ImportError, AttributeError):
            self._knobs = None

    @staticmethod
    def _key(args, meta):
        key = list(meta.items())
        for a in args:
            if isinstance(a, torch.Tensor):
                key.append((a.dtype, a.data_ptr() & 15 == 0))
            elif isinstance(a, bool) or not isinstance(a, int):
                key.append((type(a), a))
            else:
                key.append((a == 1, a & 15 == 0, -(1 << 31) <= a < (1 << 31)))
        return tuple(key)

    def __call__(self, grid, args: tuple, meta: dict) -> None:
        """kernel[grid](*args, **meta): args = the leading (non-constexpr) parameters in order, meta
        = every constexpr by name plus launch options (num_warps, ...)."""
        if self._knobs is None or interpreting():
            self.fn[grid](*args, **meta)
            return
        key = self._key(args, meta)
        dev = torch.cuda.current_device()
        entry = self.cache.get((dev, key))
        if entry is not None and self._knobs.launch_enter_hook is None and self._knobs.launch_exit_hook is None:
            kernel, tail = entry
            g1 = grid[1] if len(grid) > 1 else 1
            g2 = grid[2] if len(grid) > 2 else 1
            kernel.run(grid[0], g1, g2, torch._C._cuda_getCurrentRawStream(dev), kernel.function,
                       kernel.packed_metadata, None, None, None, *args, *tail)
            return
        kernel = self.fn[grid](*args, **meta)
        if hasattr(kernel, "result"):  # asynchronous compile mode
            kernel = kernel.result()
        names = self._arg_names[len(args):]
        if kernel is None or not hasattr(kernel, "packed_metadata") or any(n not in meta for n in names):
            return
        if len(self.cache) >= self._MAX_ENTRIES:
            self.cache.clear()
        self.cache[(dev, key)] = (kernel, tuple(meta[n] for n in names))
