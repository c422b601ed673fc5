"""What both plugins share: identity, fields (from export.schemas), and the IPluginV3 boilerplate.

Plugin classes must derive from the *imported* TensorRT module's `IPluginV3*` bases, and
`tensorrt` and `tensorrt_rtx` are different modules, so each plugin module builds its classes
with `plugin_classes(trt)`, cached per TensorRT module.
"""
from __future__ import annotations

import numpy as np

from export.schemas import DOMAIN, OPSET_VERSION, OpDecl
from omnimoe.errors import OmniMoEInputError

# Plugin identity (SPEC §4): name = op_type, version "1", namespace = the ONNX domain, so the
# parser finds the creator from the node's domain without any graph rewriting.
PLUGIN_NAMESPACE = DOMAIN
PLUGIN_VERSION = str(OPSET_VERSION)


def _field_type(trt, kind: str):
    return {"int": trt.PluginFieldType.INT32, "string": trt.PluginFieldType.CHAR}[kind]


def declared_fields(trt, op: OpDecl, keep_alive: list):
    """The creator's `field_names`: exactly the op's attributes (only these reach the plugin).

    A PluginField holds a raw pointer to its numpy data; the arrays go into `keep_alive`, which
    the caller stores on an object that outlives TensorRT's use of the collection.
    """
    fields = []
    for a in op.attributes:
        data = np.zeros(0, dtype=np.int32 if a.kind == "int" else np.int8)
        keep_alive.append(data)
        fields.append(trt.PluginField(a.name, data, _field_type(trt, a.kind)))
    keep_alive.extend(fields)
    return trt.PluginFieldCollection(fields)


def _decode_field(kind: str, data) -> int | str:
    if kind == "int":
        values = np.asarray(data).reshape(-1)
        if values.size != 1:
            raise OmniMoEInputError(f"expected one integer, got {values.tolist()}")
        return int(values[0])
    if isinstance(data, (bytes, bytearray)):
        raw = bytes(data)
    elif isinstance(data, str):
        raw = data.encode()
    else:
        raw = np.asarray(data).astype(np.int8, copy=False).reshape(-1).view(np.uint8).tobytes()
    return raw.split(b"\0", 1)[0].decode("utf-8")


def parse_fields(op: OpDecl, fc) -> dict:
    """PluginFieldCollection -> {attribute: value}, validated against the op declaration.

    ONNX INT attributes arrive as INT32, STRING as CHAR (SPEC §4); unknown fields are ignored
    (TensorRT only passes declared ones anyway), missing ones are an error.
    """
    by_name = {}
    for field in fc if fc is not None else ():
        by_name[field.name] = field.data
    attrs = {}
    for a in op.attributes:
        if a.name not in by_name:
            raise OmniMoEInputError(f"{op.op_type}: missing attribute {a.name!r}")
        try:
            value = _decode_field(a.kind, by_name[a.name])
        except (ValueError, UnicodeDecodeError) as e:
            raise OmniMoEInputError(f"{op.op_type}: attribute {a.name!r} is malformed: {e}") from None
        if a.allowed and value not in a.allowed:
            raise OmniMoEInputError(f"{op.op_type}: attribute {a.name!r} must be one of {a.allowed}, got {value!r}")
        attrs[a.name] = value
    return attrs


def serialize_fields(trt, op: OpDecl, attrs: dict, keep_alive: list):
    """{attribute: value} -> PluginFieldCollection, the same encoding the ONNX parser produces.

    The numpy buffers (PluginField keeps only their address) are appended to `keep_alive`.
    """
    fields = []
    for a in op.attributes:
        value = attrs[a.name]
        if a.kind == "int":
            data = np.array([int(value)], dtype=np.int32)
        else:
            data = np.frombuffer(str(value).encode("utf-8") + b"\0", dtype=np.int8).copy()
        keep_alive.append(data)
        fields.append(trt.PluginField(a.name, data, _field_type(trt, a.kind)))
    keep_alive.extend(fields)
    return trt.PluginFieldCollection(fields)


def make_base_class(trt, op: OpDecl):
    """The IPluginV3 (Core + Build + Runtime) boilerplate for one op, on TensorRT module `trt`."""

    class OmniPluginBase(trt.IPluginV3, trt.IPluginV3OneCore, trt.IPluginV3OneBuild, trt.IPluginV3OneRuntime):
        OP = op

        def __init__(self, attrs: dict, phase=None):
            trt.IPluginV3.__init__(self)
            trt.IPluginV3OneCore.__init__(self)
            trt.IPluginV3OneBuild.__init__(self)
            trt.IPluginV3OneRuntime.__init__(self)
            self.plugin_name = op.op_type
            self.plugin_version = PLUGIN_VERSION
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.num_outputs = len(op.outputs)
            self.attrs = dict(attrs)
            self.phase = phase

        # -- core ---------------------------------------------------------------------------
        def get_capability_interface(self, capability_type):
            return self

        def clone(self):
            twin = type(self)(self.attrs, self.phase)
            for key, value in self.__dict__.items():
                if key not in twin.__dict__ and not key.startswith("_field_"):
                    twin.__dict__[key] = value
            return twin

        # -- build --------------------------------------------------------------------------
        def configure_plugin(self, inputs, outputs):
            pass

        def get_valid_tactics(self):
            return []

        # -- runtime ------------------------------------------------------------------------
        def get_fields_to_serialize(self):
            # Kept on the plugin: TensorRT reads the field data after this call returns.
            self._field_buffers = []
            self._field_collection = serialize_fields(trt, op, self.attrs, self._field_buffers)
            return self._field_collection

        def set_tactic(self, tactic):
            pass

        def on_shape_change(self, inputs, outputs):
            pass

        def attach_to_context(self, context):
            return self.clone()

    OmniPluginBase.__name__ = f"{op.op_type}PluginBase"
    return OmniPluginBase


def make_creator_class(trt, op: OpDecl, plugin_cls):
    class OmniPluginCreator(trt.IPluginCreatorV3One):
        def __init__(self):
            trt.IPluginCreatorV3One.__init__(self)
            self.name = op.op_type
            self.plugin_namespace = PLUGIN_NAMESPACE
            self.plugin_version = PLUGIN_VERSION
            self._field_buffers = []
            self.field_names = declared_fields(trt, op, self._field_buffers)

        def create_plugin(self, name, fc, phase):
            return plugin_cls(parse_fields(op, fc), phase)

    OmniPluginCreator.__name__ = f"{op.op_type}Creator"
    return OmniPluginCreator


def constant_dim(expr) -> int | None:
    """The value of a build-time dimension expression when it is a constant, else None."""
    try:
        return int(expr.get_constant_value()) if expr.is_constant() else None
    except Exception:  # noqa: BLE001 - some TensorRT versions raise for non-constant exprs
        return None


def type_is(trt, desc_type, *names: str) -> bool:
    return any(desc_type == getattr(trt.DataType, n) for n in names if hasattr(trt.DataType, n))
