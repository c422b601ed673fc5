"""Exported custom nodes name their plugin namespace; exported files carry no stack traces or
local paths, and keep the metadata users need (issue 13 item 3)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnxscript import ir

import omnimoe
from export import schemas
from export.onnx_export import export_onnx
from export.ort import ort_session
from omnimoe import OmniMoEConfig, OmniMoELayer
from omnimoe.models import TinyOmniLM
from omnimoe.train import tiny_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    layer = OmniMoELayer(OmniMoEConfig(hidden_size=16, num_experts=36, top_k=4, intermediate_size=24)).eval()
    lm = TinyOmniLM(tiny_config("abcdefghij ")).eval()
    out = tmp_path_factory.mktemp("clean")
    paths = {}
    for ops in ("plugin", "standard"):
        paths["layer", ops] = export_onnx(layer, out / f"layer.{ops}.onnx", example_inputs=(torch.zeros(2, 3, 16),), ops=ops,
                                          input_names=["x"], output_names=["y"], dynamic_shapes=({0: "batch", 1: "seq"},)).path
    paths["lm", "plugin"] = export_onnx(lm, out / "lm.onnx", example_inputs=(torch.zeros(2, 3, dtype=torch.long),), ops="plugin",
                                        input_names=["input_ids"], output_names=["logits"],
                                        dynamic_shapes=({0: "batch", 1: "seq"},), dtype="fp16").path
    return layer, lm, paths, out


def test_plugin_nodes_carry_plugin_namespace(exported):
    _, _, paths, _ = exported
    for key in (("layer", "plugin"), ("lm", "plugin")):
        model = onnx.load(str(paths[key]))
        custom = [n for n in model.graph.node if n.domain == schemas.DOMAIN]
        assert len(custom) >= 2
        for node in custom:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attrs["plugin_namespace"] == b"omnimoe", node.op_type
            decl = schemas.op_by_type(node.op_type)
            assert set(attrs) == set(decl.attribute_names) | {"plugin_namespace"}
        schemas.register_onnx_schemas()
        onnx.checker.check_model(model, full_check=True, check_custom_domain=True)
    # ... and ONNX Runtime (onnxruntime-extensions ops) runs the graph that carries it.
    y = ort_session(paths["layer", "plugin"]).run(None, {"x": np.ones((1, 2, 16), np.float32)})[0]
    assert y.shape == (1, 2, 16) and np.isfinite(y).all()


def test_plugin_fields_stay_the_op_attributes():
    """plugin_namespace identifies the plugin; it is not an op parameter, so the plugins' field
    lists (generated from OpDecl.attributes) do not change."""
    assert schemas.PRODUCT_KEY_TOPK.attribute_names == ["top_k", "gate"]
    assert schemas.EXPERT_GROUPED_MATMUL.attribute_names == ["activation"]
    assert [a.name for a in schemas.NODE_ONLY_ATTRIBUTES] == ["plugin_namespace"]
    schemas.register_onnx_schemas()
    schema = onnx.defs.get_schema(schemas.PRODUCT_KEY_TOPK.op_type, schemas.OPSET_VERSION, schemas.DOMAIN)
    assert set(schema.attributes) == {"top_k", "gate", "plugin_namespace"}
    assert schema.attributes["top_k"].required and not schema.attributes["plugin_namespace"].required


def _ir_node(**attrs):
    return ir.Node(schemas.DOMAIN, schemas.EXPERT_GROUPED_MATMUL.op_type, [None] * 5,
                   attributes=[ir.AttrString(k, v) for k, v in attrs.items()], num_outputs=1)


def test_check_ir_node_wants_the_namespace():
    schemas.check_ir_node(_ir_node(activation="silu", plugin_namespace="omnimoe"))
    with pytest.raises(ValueError, match="attributes"):
        schemas.check_ir_node(_ir_node(activation="silu"))
    with pytest.raises(ValueError, match="plugin_namespace"):
        schemas.check_ir_node(_ir_node(activation="silu", plugin_namespace="other"))


def test_no_stack_traces_or_local_paths(exported):
    _, _, paths, out = exported
    # Paths of this machine the exporter could leak: the sources, the interpreter, the output dir.
    local = {str(REPO), str(Path(torch.__file__).parent), sys.prefix, str(out), str(Path.home())} - {"/"}
    for path in paths.values():
        blob = path.read_bytes()
        for needle in ["stack_trace", "pkg.torch", "fx_node", *local]:
            assert needle.encode() not in blob, f"{path.name} contains {needle!r}"
        model = onnx.load(str(path))
        assert not model.graph.metadata_props and not any(n.metadata_props for n in model.graph.node)


def test_metadata_keeps_version_config_dtype(exported):
    layer, lm, paths, _ = exported
    meta = {p.key: p.value for p in onnx.load(str(paths["layer", "standard"])).metadata_props}
    assert meta["omnimoe.version"] == omnimoe.__version__
    assert meta["omnimoe.ops"] == "standard" and meta["omnimoe.dtype"] == "fp32"
    assert json.loads(meta["omnimoe.config"]) == layer.config.to_dict()
    meta = {p.key: p.value for p in onnx.load(str(paths["lm", "plugin"])).metadata_props}
    assert meta["omnimoe.dtype"] == "fp16" and json.loads(meta["omnimoe.config"]) == lm.config.to_dict()
