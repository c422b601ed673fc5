"""TensorRT IPluginV3 plugins for the OmniMoE custom ops (SPEC §3, §4).

    import trt_plugins
    trt = trt_plugins.register()          # or register(backend="tensorrt-rtx") / register(trt_module)
    parser = trt.OnnxParser(network, logger)
    parser.parse_from_file("layer.onnx")  # omnimoe::OmniProductKeyTopK / OmniExpertGroupedMatMul
                                          # nodes become plugin layers, no graph rewriting

Each plugin is registered under name = op_type, version "1", namespace "omnimoe" (the node
domain, which the ONNX parser uses as the plugin namespace); with full TensorRT also under the
default namespace "" for older parsers that do not consult the node domain. `register()` is
idempotent: calling it again (or for an engine deserialized later in the same process)
registers nothing twice.

The kernels behind `enqueue` are `omnimoe.kernels` (Triton), the same ones `backend="triton"`
uses in PyTorch. Engines that contain these plugins need the plugins registered (this package
imported and `register()` called) in the process that deserializes them.
"""
from __future__ import annotations

from ._base import PLUGIN_NAMESPACE, PLUGIN_VERSION
from ._trt import BACKENDS, backend_of, load, resolve_backend

__all__ = [
    "BACKENDS",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "backend_of",
    "creators",
    "is_registered",
    "load",
    "register",
    "register_default_namespace_aliases",
    "resolve_backend",
    "unregister",
]

# TensorRT module name -> {op_type: creator instance}. Creators are kept alive here: the
# registry holds a raw pointer to each Python creator.
_REGISTERED: dict[str, dict] = {}
# The same for the default-namespace aliases registered for full TensorRT (see register()).
_ALIASES: dict[str, dict] = {}


def _plugin_modules():
    from . import grouped_matmul_plugin, topk_plugin

    return (topk_plugin, grouped_matmul_plugin)


def creators(trt) -> dict:
    """{op_type: creator} registered for TensorRT module `trt` (empty before `register`)."""
    return dict(_REGISTERED.get(trt.__name__, {}))


def _find_creator(trt, op_type: str, namespace: str = PLUGIN_NAMESPACE):
    # all_creators rather than get_creator: the latter logs an error for a missing creator.
    for creator in trt.get_plugin_registry().all_creators:
        if (
            getattr(creator, "name", None) == op_type
            and getattr(creator, "plugin_version", None) == PLUGIN_VERSION
            and getattr(creator, "plugin_namespace", None) == namespace
        ):
            return creator
    return None


def register_default_namespace_aliases(trt) -> None:
    """Also register each creator under the default namespace "" (idempotent).

    ONNX parsers look a custom node up by its `plugin_namespace` attribute (default "") and,
    in recent versions (seen in TensorRT-RTX 1.7's parser and in onnx-tensorrt's fallback
    importer), then by the node's domain. Which older releases lack the second lookup was not
    checked (JetPack 6's TensorRT 10.3 may), so `register()` adds these aliases for full TensorRT. The plugins they create are the
    same classes and still report namespace "omnimoe", under which engines find them at runtime.
    """
    aliases = _ALIASES.setdefault(trt.__name__, {})
    registry = trt.get_plugin_registry()
    for module in _plugin_modules():
        op_type = module.OP.op_type
        if op_type in aliases or _find_creator(trt, op_type, "") is not None:
            continue
        _, creator_cls = module.plugin_classes(trt)
        creator = creator_cls()
        creator.plugin_namespace = ""
        if not registry.register_creator(creator, ""):
            raise RuntimeError(f"TensorRT refused to register the {op_type} plugin creator under namespace ''")
        aliases[op_type] = creator


def unregister(trt) -> None:
    """Remove this package's Python creators (and aliases) from `trt`'s registry, so that a
    native plugin library with the same identity can be loaded in this process."""
    registry = trt.get_plugin_registry()
    for table in (_REGISTERED, _ALIASES):
        for creator in table.pop(trt.__name__, {}).values():
            registry.deregister_creator(creator)


def is_registered(trt, op_type: str) -> bool:
    """Whether a creator for `op_type` (version "1", namespace "omnimoe") is in `trt`'s registry."""
    return _find_creator(trt, op_type) is not None


def register(trt=None, *, backend: str = "auto"):
    """Register both plugin creators with `trt`'s plugin registry (once); return the module.

    `trt` is an imported TensorRT module (`tensorrt` or `tensorrt_rtx`); when omitted, the
    module for `backend` (auto | tensorrt | tensorrt-rtx) is loaded through the import shim,
    which also applies the tensorrt_rtx library fix.
    """
    if trt is None:
        trt = load(backend)
    elif backend_of(trt) == "tensorrt-rtx":
        from ._trt import ensure_rtx_libs

        ensure_rtx_libs()
    done = _REGISTERED.setdefault(trt.__name__, {})
    registry = trt.get_plugin_registry()
    for module in _plugin_modules():
        op_type = module.OP.op_type
        if op_type in done:
            continue
        existing = _find_creator(trt, op_type)
        if existing is not None:
            # Registered by another copy of this package (e.g. reloaded module): keep theirs.
            done[op_type] = existing
            continue
        _, creator_cls = module.plugin_classes(trt)
        creator = creator_cls()
        if not registry.register_creator(creator, PLUGIN_NAMESPACE):
            raise RuntimeError(f"TensorRT refused to register the {op_type} plugin creator")
        done[op_type] = creator
    if backend_of(trt) == "tensorrt":
        register_default_namespace_aliases(trt)
    return trt
