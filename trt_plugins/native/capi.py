"""ctypes view of libomnimoe_trt_plugins.so's C ABI (what `enqueue` itself calls).

    lib = capi.NativeLib("out/libomnimoe_trt_plugins.so")
    lib.info()                                      # SMs, variants, versions (no GPU needed)
    lib.topk_launch(lx_ptr, ly_ptr, gates_ptr, idx_ptr, ws_ptr, ws_bytes, T, s, K, softmax, stream)
    capi.SCHEDULES[lib.experts_schedule(T, K, N)]    # "token" | "hybrid" | "grid", as "auto" picks

Pointers and the stream are plain integers (e.g. `tensor.data_ptr()`, `stream.cuda_stream`), so
this module needs neither torch nor TensorRT.
"""
from __future__ import annotations

import ctypes
import json

_P, _I32, _I64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64

# name -> (restype, argtypes), exactly as declared in plugins.cpp's extern "C" block.
_SIGNATURES = {
    "omnimoe_native_topk_launch": (_I32, [_P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _P]),
    "omnimoe_native_experts_launch": (_I32, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32, _I32, _I32, _I32, _P]),
    "omnimoe_native_topk_workspace_bytes": (_I64, [_I64, _I32, _I32]),
    "omnimoe_native_experts_workspace_bytes": (_I64, [_I64, _I32, _I32, _I32]),
    "omnimoe_native_experts_schedule": (_I32, [_I64, _I32, _I32]),
    "omnimoe_native_experts_last_schedule": (_I32, []),
    "omnimoe_native_last_error": (ctypes.c_char_p, []),
    "omnimoe_native_clear_error": (None, []),
    "omnimoe_native_info": (ctypes.c_char_p, []),
    "omnimoe_native_prepare": (_I32, []),
    "omnimoe_native_harness_topk": (_I32, [_I32, ctypes.c_char_p, _I64, _I32, _P, _P, _P, _P, _P, _P]),
    "omnimoe_native_harness_experts": (
        _I32, [ctypes.c_char_p, _I32, _I64, _I32, _I32, _I32, _P, _P, _P, _P, _P, _P, _P, _P]),
}

DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
# What omnimoe_native_experts_schedule / _last_schedule return, by code (expert_grouped_matmul_triton's names).
SCHEDULES = ("token", "hybrid", "grid")


class NativeLib:
    def __init__(self, path):
        self.path = str(path)
        self._lib = ctypes.CDLL(self.path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(self._lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            if name not in ("omnimoe_native_info", "omnimoe_native_last_error"):  # wrapped below
                setattr(self, name.removeprefix("omnimoe_native_"), fn)

    def info(self) -> dict:
        return json.loads(self._lib.omnimoe_native_info().decode())

    def error(self) -> str:
        return (self._lib.omnimoe_native_last_error() or b"").decode()
