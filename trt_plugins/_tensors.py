"""TensorRT tensor descriptors and raw device pointers -> torch tensors, with zero copies.

`enqueue` receives `PluginTensorDesc`s (dims, type) and raw device addresses. `as_torch` wraps
one as a torch tensor through `__cuda_array_interface__`: no device allocation, no copy, no
stream synchronisation (the interface's `stream` is left out, so torch does not sync), which
keeps `enqueue` CUDA-graph capturable. bfloat16 has no CUDA-array-interface type string, so it
is wrapped as int16 and reinterpreted with `.view(torch.bfloat16)` (still no copy).
"""
from __future__ import annotations

import math

import torch

# TensorRT DataType member name -> (array-interface typestr, torch dtype, itemsize)
_TYPES = {
    "FLOAT": ("<f4", torch.float32, 4),
    "HALF": ("<f2", torch.float16, 2),
    "BF16": ("<i2", torch.bfloat16, 2),
    "INT32": ("<i4", torch.int32, 4),
    "INT64": ("<i8", torch.int64, 8),
    "INT8": ("|i1", torch.int8, 1),
    "UINT8": ("|u1", torch.uint8, 1),
    "BOOL": ("|b1", torch.bool, 1),
}

# Float types the plugins accept for x / up / down (TensorRT DataType member names).
FLOAT_TYPE_NAMES = ("FLOAT", "HALF", "BF16")


def type_name(dtype) -> str:
    """'FLOAT', 'HALF', 'BF16', ... for a TensorRT DataType (either module)."""
    return dtype.name if hasattr(dtype, "name") else str(dtype).rsplit(".", 1)[-1]


def torch_dtype(dtype) -> torch.dtype:
    name = type_name(dtype)
    if name not in _TYPES:
        raise TypeError(f"TensorRT type {name} has no torch equivalent here")
    return _TYPES[name][1]


def dims_tuple(dims) -> tuple[int, ...]:
    return tuple(int(d) for d in dims)


class _DeviceArray:
    """The minimal object torch.as_tensor needs: a CUDA array interface (v3) over a raw pointer."""

    __slots__ = ("__cuda_array_interface__",)

    def __init__(self, ptr: int, shape: tuple[int, ...], typestr: str):
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": typestr,
            "data": (int(ptr), False),
            "strides": None,  # C-contiguous (TensorFormat.LINEAR)
            "version": 3,
        }


def wrap_pointer(ptr: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A torch view of `shape`/`dtype` over device memory at `ptr` (zero copies)."""
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) == 0:
        # Empty tensors may come with a null pointer; nothing will be read or written.
        return torch.empty(shape, dtype=dtype, device="cuda")
    if dtype == torch.bfloat16:
        return torch.as_tensor(_DeviceArray(ptr, shape, "<i2"), device="cuda").view(torch.bfloat16)
    typestr = next(t for t, dt, _ in _TYPES.values() if dt == dtype)
    return torch.as_tensor(_DeviceArray(ptr, shape, typestr), device="cuda")


def as_torch(desc, ptr: int) -> torch.Tensor:
    """Wrap TensorRT's (PluginTensorDesc, device pointer) as a torch tensor."""
    return wrap_pointer(ptr, dims_tuple(desc.dims), torch_dtype(desc.type))


def workspace_tensor(ptr: int, nbytes: int) -> torch.Tensor:
    """TensorRT's scratch pointer as a uint8 tensor of `nbytes` (size computed by the plugin)."""
    return wrap_pointer(ptr, (int(nbytes),), torch.uint8)
