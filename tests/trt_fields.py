"""Plugin fields encoded as TensorRT's ONNX parser passes them (shared by the TensorRT tests)."""
import numpy as np

_KEEP_ALIVE = []  # PluginField keeps only the address of its numpy data


def plugin_fields(trt, **values):
    """INT attributes as INT32, STRING attributes as NUL-terminated CHAR."""
    fields = []
    for name, value in values.items():
        if isinstance(value, int):
            data, kind = np.array([value], np.int32), trt.PluginFieldType.INT32
        else:
            data, kind = np.frombuffer(value.encode() + b"\0", np.int8).copy(), trt.PluginFieldType.CHAR
        _KEEP_ALIVE.append(data)
        fields.append(trt.PluginField(name, data, kind))
    return trt.PluginFieldCollection(fields)
