"""Native (Python-free) TensorRT plugins: a C++ IPluginV3 library running AOT-compiled Triton kernels.

`omnimoe build --plugins native` calls `build_library(variants_from_onnx(model), ...)`: the model's
kernel variants are compiled with triton for each SM asked for (aot.py), the C++ source is generated
from the op contract and the compiler's output (codegen.py + plugins.cpp) and compiled with g++
(library.py). The engine and that one .so are the whole deployment (trtexec --dynamicPlugins,
Triton Inference Server, DeepStream, ORT's TensorRT EP, C++ apps on Jetson).
"""
from .aot import DEFAULT_SMS, SUPPORTED_SMS, ExpertsVariant, TopKVariant, parse_sms
from .capi import NativeLib
from .library import LIBRARY_NAME, SOURCE_NAME, NativeLibrary, build_library, variants_from_onnx

__all__ = [
    "DEFAULT_SMS",
    "LIBRARY_NAME",
    "SOURCE_NAME",
    "SUPPORTED_SMS",
    "ExpertsVariant",
    "NativeLib",
    "NativeLibrary",
    "TopKVariant",
    "build_library",
    "parse_sms",
    "variants_from_onnx",
]
