"""TensorRT plugins at build time and `omnimoe build` (issue 5), on CPU with TensorRT-RTX.

TensorRT-RTX parses and builds engines without a GPU, so everything up to a serialized engine is
checked here: plugin registration and fields, the plugin layers the ONNX parser creates from
hand-made and exported (layer, TinyOmniLM) graphs, output shapes/types, dynamic token profiles,
workspace sizing from the profile's maximum T, and the CLI's error cases. Engine *execution*
is not testable here (SPEC §5); `enqueue` is tested on the GPU in test_trt_plugins_gpu.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from trt_fields import plugin_fields
from export.schemas import DOMAIN, EXPERT_GROUPED_MATMUL, OPSET_VERSION, PRODUCT_KEY_TOPK
from omnimoe.errors import OmniMoEInputError

REPO = Path(__file__).resolve().parents[1]

trt_plugins = pytest.importorskip("trt_plugins")
try:
    trt_plugins.resolve_backend("tensorrt-rtx")
except OmniMoEInputError:
    pytest.skip("TensorRT-RTX is not installed", allow_module_level=True)
from deploy import build as build_mod  # noqa: E402
from deploy.cli import main as cli_main  # noqa: E402
from omnimoe import kernels  # noqa: E402

RTX = "tensorrt-rtx"


@pytest.fixture(scope="module")
def trt():
    return trt_plugins.register(backend=RTX)


# ------------------------------------------------------------------------------------------------
# Hand-made plugin graphs (onnx.helper), straight from the export.schemas declarations
# ------------------------------------------------------------------------------------------------
def make_plugin_graph(
    path: Path,
    *,
    s: int = 4,
    d: int = 8,
    top_k: int = 3,
    gate: str = "product",
    activation: str = "gelu_tanh",
    dtype: int = TensorProto.FLOAT,
    token_dim="T",
    topk_op: str = PRODUCT_KEY_TOPK.op_type,
    topk_domain: str = DOMAIN,
) -> Path:
    """x [T, d] -> router matmuls -> LogSoftmax (fp32) -> OmniProductKeyTopK -> OmniExpertGroupedMatMul."""
    rng = np.random.default_rng(0)

    def init(name, shape, elem_type):
        values = rng.standard_normal(shape).astype(np.float32)
        if elem_type == TensorProto.BFLOAT16:
            return helper.make_tensor(name, elem_type, shape, vals=values.flatten().tolist())
        return onnx.numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(elem_type)), name)

    gm = EXPERT_GROUPED_MATMUL
    nodes = [
        helper.make_node("MatMul", ["x", "w_x"], ["logits_x"]),
        helper.make_node("MatMul", ["x", "w_y"], ["logits_y"]),
        helper.make_node("Cast", ["logits_x"], ["logits_x32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["logits_y"], ["logits_y32"], to=TensorProto.FLOAT),
        helper.make_node("LogSoftmax", ["logits_x32"], ["log_probs_x"], axis=-1),
        helper.make_node("LogSoftmax", ["logits_y32"], ["log_probs_y"], axis=-1),
        helper.make_node(
            topk_op, ["log_probs_x", "log_probs_y"], ["gates", "indices"], name="router_topk",
            domain=topk_domain, top_k=top_k, gate=gate,
        ),
        helper.make_node(
            gm.op_type, ["x", "up", "down", "gates", "indices"], ["y"], name="experts", domain=DOMAIN, activation=activation
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "omnimoe_layer",
        [helper.make_tensor_value_info("x", dtype, [token_dim, d])],
        [helper.make_tensor_value_info("y", dtype, [token_dim, d])],
        [init("w_x", (d, s), dtype), init("w_y", (d, s), dtype), init("up", (s * s, d), dtype), init("down", (s * s, d), dtype)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    onnx.save(model, str(path))
    return path


def plugin_layer_summary(parsed):
    out = []
    for layer in parsed.plugin_layers():
        plugin = layer.plugin
        out.append(
            {
                "name": plugin.plugin_name,
                "version": plugin.plugin_version,
                "namespace": plugin.plugin_namespace,
                "attrs": dict(plugin.attrs),
                "inputs": [(tuple(layer.get_input(i).shape), layer.get_input(i).dtype) for i in range(layer.num_inputs)],
                "outputs": [(tuple(layer.get_output(i).shape), layer.get_output(i).dtype) for i in range(layer.num_outputs)],
            }
        )
    return out


# ------------------------------------------------------------------------------------------------
# Registration, fields
# ------------------------------------------------------------------------------------------------
def _registry_entries(trt, op_type):
    return [
        c
        for c in trt.get_plugin_registry().all_creators
        if getattr(c, "name", None) == op_type and getattr(c, "plugin_namespace", None) == DOMAIN
    ]


def test_register_is_idempotent_and_uses_schema_identity(trt):
    first = trt_plugins.creators(trt)
    assert trt_plugins.register(trt) is trt
    trt_plugins.register(backend=RTX)
    assert trt_plugins.creators(trt) == first
    for op in (PRODUCT_KEY_TOPK, EXPERT_GROUPED_MATMUL):
        entries = _registry_entries(trt, op.op_type)
        assert len(entries) == 1, f"{op.op_type} registered {len(entries)} times"
        creator = entries[0]
        assert (creator.name, creator.plugin_version, creator.plugin_namespace) == (op.op_type, "1", "omnimoe")
        fields = {f.name: f.type for f in creator.field_names}
        expected = {
            a.name: trt.PluginFieldType.INT32 if a.kind == "int" else trt.PluginFieldType.CHAR for a in op.attributes
        }
        assert fields == expected
        assert trt_plugins.is_registered(trt, op.op_type)


def test_fields_serialize_round_trip_and_are_validated(trt):
    creators = trt_plugins.creators(trt)
    topk = creators[PRODUCT_KEY_TOPK.op_type].create_plugin("t", plugin_fields(trt, top_k=7, gate="softmax"), trt.TensorRTPhase.BUILD)
    assert topk.attrs == {"top_k": 7, "gate": "softmax"}
    again = creators[PRODUCT_KEY_TOPK.op_type].create_plugin("t", topk.get_fields_to_serialize(), trt.TensorRTPhase.RUNTIME)
    assert again.attrs == topk.attrs and again.phase == trt.TensorRTPhase.RUNTIME
    clone = again.attach_to_context(None)
    assert clone is not again and clone.attrs == again.attrs
    gm = creators[EXPERT_GROUPED_MATMUL.op_type].create_plugin("e", plugin_fields(trt, activation="relu"), trt.TensorRTPhase.BUILD)
    assert gm.attrs == {"activation": "relu"}
    assert (gm.plugin_name, gm.plugin_version, gm.plugin_namespace, gm.num_outputs) == (EXPERT_GROUPED_MATMUL.op_type, "1", "omnimoe", 1)
    with pytest.raises(OmniMoEInputError, match="gate"):
        creators[PRODUCT_KEY_TOPK.op_type].create_plugin("t", plugin_fields(trt, top_k=2, gate="argmax"), trt.TensorRTPhase.BUILD)
    with pytest.raises(OmniMoEInputError, match="top_k"):
        creators[PRODUCT_KEY_TOPK.op_type].create_plugin("t", plugin_fields(trt, gate="product"), trt.TensorRTPhase.BUILD)
    with pytest.raises(OmniMoEInputError, match="activation"):
        creators[EXPERT_GROUPED_MATMUL.op_type].create_plugin("e", plugin_fields(trt, activation="tanh"), trt.TensorRTPhase.BUILD)


def _dyn_desc(trt, dtype, lo, opt, hi):
    d = trt.DynamicPluginTensorDesc()
    desc = trt.PluginTensorDesc()
    desc.dims = trt.Dims([-1 if a != b else a for a, b in zip(lo, hi)])
    desc.type = dtype
    desc.format = trt.TensorFormat.LINEAR
    d.desc = desc
    d.min, d.opt, d.max = trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi))
    return d


def test_workspace_sizes_come_from_the_profile_max_tokens(trt):
    creators = trt_plugins.creators(trt)
    s, K, d, N = 32, 16, 64, 1024
    topk = creators[PRODUCT_KEY_TOPK.op_type].create_plugin("t", plugin_fields(trt, top_k=K, gate="product"), trt.TensorRTPhase.BUILD)
    lp = _dyn_desc(trt, trt.DataType.FLOAT, (1, s), (8, s), (4096, s))
    outs = [_dyn_desc(trt, trt.DataType.FLOAT, (1, K), (8, K), (4096, K)), _dyn_desc(trt, trt.DataType.INT32, (1, K), (8, K), (4096, K))]
    assert topk.get_workspace_size([lp, lp], outs) == kernels.topk_workspace_bytes(4096, s, K)

    gm = creators[EXPERT_GROUPED_MATMUL.op_type].create_plugin("e", plugin_fields(trt, activation="silu"), trt.TensorRTPhase.BUILD)
    ins = [
        _dyn_desc(trt, trt.DataType.BF16, (1, d), (8, d), (300, d)),
        _dyn_desc(trt, trt.DataType.BF16, (N, d), (N, d), (N, d)),
        _dyn_desc(trt, trt.DataType.BF16, (N, d), (N, d), (N, d)),
        _dyn_desc(trt, trt.DataType.FLOAT, (1, K), (8, K), (300, K)),
        _dyn_desc(trt, trt.DataType.INT32, (1, K), (8, K), (300, K)),
    ]
    out = [_dyn_desc(trt, trt.DataType.BF16, (1, d), (8, d), (300, d))]
    assert gm.get_workspace_size(ins, out) == kernels.expert_workspace_bytes(300, K, N, d)


# ------------------------------------------------------------------------------------------------
# Parsing: the plugin layers the ONNX parser creates
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,trt_dtype",
    [(TensorProto.FLOAT, "FLOAT"), (TensorProto.FLOAT16, "HALF"), (TensorProto.BFLOAT16, "BF16")],
)
def test_handmade_graph_parses_into_plugin_layers(trt, tmp_path, dtype, trt_dtype):
    path = make_plugin_graph(tmp_path / "layer.onnx", s=4, d=8, top_k=5, gate="softmax", activation="gelu", dtype=dtype)
    parsed = build_mod.parse_network(path, backend=RTX)
    layers = plugin_layer_summary(parsed)
    x_type = getattr(trt.DataType, trt_dtype)
    F, I32 = trt.DataType.FLOAT, trt.DataType.INT32
    assert layers == [
        {
            "name": "OmniProductKeyTopK", "version": "1", "namespace": "omnimoe",
            "attrs": {"top_k": 5, "gate": "softmax"},
            "inputs": [((-1, 4), F), ((-1, 4), F)],
            "outputs": [((-1, 5), F), ((-1, 5), I32)],
        },
        {
            "name": "OmniExpertGroupedMatMul", "version": "1", "namespace": "omnimoe",
            "attrs": {"activation": "gelu"},
            "inputs": [((-1, 8), x_type), ((16, 8), x_type), ((16, 8), x_type), ((-1, 5), F), ((-1, 5), I32)],
            "outputs": [((-1, 8), x_type)],
        },
    ]
    assert [layer.name for layer in parsed.plugin_layers()] == ["router_topk", "experts"]


def test_handmade_graph_builds_engine_with_serialized_fields(tmp_path):
    path = make_plugin_graph(tmp_path / "layer.onnx", s=4, d=8, top_k=3, gate="product", activation="gelu_tanh")
    result = build_mod.build_engine(path, backend=RTX, tokens="1:16:256")
    assert result.backend == RTX and result.precision == "fp32"
    assert result.shapes == {"x": ((1, 8), (16, 8), (256, 8))}
    plan = result.engine
    assert len(plan) > 1000
    # The plugins' identity and serialized fields travel in the plan (runtime re-creates them).
    for needle in (b"OmniProductKeyTopK", b"OmniExpertGroupedMatMul", b"omnimoe", b"product", b"gelu_tanh"):
        assert needle in plan, needle


def test_static_token_dim_builds_without_profile(tmp_path):
    path = make_plugin_graph(tmp_path / "static.onnx", token_dim=5)
    parsed = build_mod.parse_network(path, backend=RTX)
    assert [o for layer in plugin_layer_summary(parsed) for o in layer["outputs"]][:1] == [((5, 3), parsed.trt.DataType.FLOAT)]
    result = build_mod.build_engine(path, backend=RTX)
    assert result.shapes == {} and len(result.engine) > 1000


def test_top_k_larger_than_num_experts_is_rejected_at_build(tmp_path, capsys):
    path = make_plugin_graph(tmp_path / "bad.onnx", s=2, top_k=5)  # N = 4
    out = tmp_path / "bad.engine"
    assert _cli(["build", str(path), "-o", str(out), "--backend", RTX, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "OmniProductKeyTopK" in err, err
    assert not out.exists() and not list(tmp_path.glob(".bad.engine*"))


# ------------------------------------------------------------------------------------------------
# Exported graphs (export.onnx_export): layer and TinyOmniLM
# ------------------------------------------------------------------------------------------------
def _small_layer(top_k=6, gate="softmax", act="silu"):
    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    torch.manual_seed(0)
    config = OmniMoEConfig(hidden_size=32, num_experts=64, top_k=top_k, intermediate_size=48, hidden_act=act, gate=gate)
    return OmniMoELayer(config).eval()


def _small_lm():
    from omnimoe.config import OmniMoEConfig
    from omnimoe.models import TinyOmniLM, TinyOmniLMConfig

    torch.manual_seed(1)
    moe = OmniMoEConfig(hidden_size=32, num_experts=64, top_k=5, intermediate_size=48, gate="product")
    return TinyOmniLM(TinyOmniLMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=512, moe=moe)).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from export.onnx_export import export_onnx

    directory = tmp_path_factory.mktemp("exported")
    axes = ({0: "batch", 1: "seq"},)
    paths = {}
    layer = _small_layer()
    for dt in ("fp32", "fp16", "bf16"):
        paths[f"layer-{dt}"] = directory / f"layer-{dt}.onnx"
        export_onnx(layer, paths[f"layer-{dt}"], example_inputs=(torch.zeros(2, 3, 32),), ops="plugin", dtype=dt,
                    input_names=["x"], output_names=["y"], dynamic_shapes=axes)
    paths["lm"] = directory / "lm.onnx"
    export_onnx(_small_lm(), paths["lm"], example_inputs=(torch.zeros(2, 3, dtype=torch.long),), ops="plugin",
                input_names=["input_ids"], output_names=["logits"], dynamic_shapes=axes)
    return paths


@pytest.mark.parametrize("dt,trt_dtype", [("fp32", "FLOAT"), ("fp16", "HALF"), ("bf16", "BF16")])
def test_exported_layer_builds_with_plugins(trt, exported, dt, trt_dtype):
    parsed = build_mod.parse_network(exported[f"layer-{dt}"], backend=RTX)
    layers = plugin_layer_summary(parsed)
    assert [l["name"] for l in layers] == ["OmniProductKeyTopK", "OmniExpertGroupedMatMul"]
    topk, gm = layers
    assert topk["attrs"] == {"top_k": 6, "gate": "softmax"} and gm["attrs"] == {"activation": "silu"}
    F, I32, X = trt.DataType.FLOAT, trt.DataType.INT32, getattr(trt.DataType, trt_dtype)
    assert topk["inputs"] == [((-1, 8), F), ((-1, 8), F)]
    assert topk["outputs"] == [((-1, 6), F), ((-1, 6), I32)]
    assert gm["inputs"] == [((-1, 32), X), ((64, 32), X), ((64, 32), X), ((-1, 6), F), ((-1, 6), I32)]
    assert gm["outputs"] == [((-1, 32), X)]

    result = build_mod.build_engine(exported[f"layer-{dt}"], backend=RTX, tokens="1:64:512")
    assert result.precision == dt
    # Layer input x [batch, seq, d]: seq spans the token range, batch is fixed to 1.
    assert result.shapes == {"x": ((1, 1, 32), (1, 64, 32), (1, 512, 32))}
    assert [p for _, p, _ in result.plugin_layers] == ["OmniProductKeyTopK", "OmniExpertGroupedMatMul"]


def test_exported_tiny_lm_builds_with_one_plugin_pair_per_layer(trt, exported):
    parsed = build_mod.parse_network(exported["lm"], backend=RTX)
    layers = plugin_layer_summary(parsed)
    assert [l["name"] for l in layers] == ["OmniProductKeyTopK", "OmniExpertGroupedMatMul"] * 2
    for topk in layers[0::2]:
        assert topk["attrs"] == {"top_k": 5, "gate": "product"}
        assert topk["outputs"] == [((-1, 5), trt.DataType.FLOAT), ((-1, 5), trt.DataType.INT32)]
    for gm in layers[1::2]:
        assert gm["outputs"] == [((-1, 32), trt.DataType.FLOAT)]
    result = build_mod.build_engine(exported["lm"], backend=RTX, tokens="1:32:512")
    assert result.shapes == {"input_ids": ((1, 1), (1, 32), (1, 512))}
    assert len(result.plugin_layers) == 4


@pytest.mark.parametrize("tokens,expected", [("1:64:512", (1, 64, 512)), ("7", (7, 7, 7)), ("2:2:9", (2, 2, 9))])
def test_dynamic_token_profiles(exported, tokens, expected):
    parsed = build_mod.parse_network(exported["layer-fp32"], backend=RTX)
    shapes = build_mod.token_shapes(parsed, build_mod.parse_tokens(tokens))
    assert shapes == {"x": tuple((1, t, 32) for t in expected)}
    # The same bounds reach TensorRT through polygraphy's Profile.
    (profile,) = build_mod.polygraphy_profiles(build_mod.polygraphy_trt(parsed.trt), [shapes])
    trt_profile = profile.to_trt(parsed.builder, parsed.network)
    assert tuple(tuple(s) for s in trt_profile.get_shape("x")) == shapes["x"]


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
def test_cli_export_then_build_from_a_checkpoint(tmp_path):
    """The issue's "done when": omnimoe export, then omnimoe build --backend tensorrt-rtx, on CPU."""
    ckpt = tmp_path / "ckpt"
    _small_layer(top_k=4, gate="product", act="gelu").save_pretrained(ckpt)
    onnx_path, engine = tmp_path / "layer.onnx", tmp_path / "out" / "layer.engine"
    for argv in (
        ["export", str(ckpt), "-o", str(onnx_path), "--ops", "plugin"],
        ["build", str(onnx_path), "-o", str(engine), "--backend", RTX, "--tokens", "1:16:128"],
    ):
        proc = subprocess.run([sys.executable, "-m", "deploy.cli", *argv], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    assert engine.is_file() and engine.stat().st_size > 1000
    assert "2 plugin layers" in proc.stdout and "tensorrt-rtx" in proc.stdout
    # The engine, what it holds, and its native plugin library (+ source); no temp files left.
    assert sorted(p.name for p in engine.parent.iterdir()) == [
        "layer.engine", "layer.engine.json", "libomnimoe_trt_plugins.so", "omnimoe_trt_plugins.cpp"]


def _cli(argv) -> int:
    try:
        return cli_main(argv)
    except SystemExit as e:  # argparse usage errors exit from inside the parser
        return int(e.code)


def test_cli_build_bf16_with_timing_cache_option(exported, tmp_path, capsys):
    """TensorRT-RTX has no build-time timing cache: the option is accepted, noted, file untouched."""
    cache = tmp_path / "timing.cache"
    engine = tmp_path / "e.engine"
    rc = _cli(["build", str(exported["layer-bf16"]), "-o", str(engine), "--backend", RTX,
               "--precision", "bf16", "--timing-cache", str(cache), "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert engine.stat().st_size > 1000
    assert "bf16" in captured.out and "2 plugin layers" in captured.out
    assert "no build-time timing cache" in captured.err and not cache.exists()


def _expect_one_line_error(argv, capsys, *needles):
    rc = _cli(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("tokens", ["0:1:2", "5:3:9", "1:8:4", "a:b:c", "1:2", "1:2:3:4", "-1"])
def test_cli_invalid_token_range(tmp_path, capsys, tokens):
    path = make_plugin_graph(tmp_path / "m.onnx")
    out = tmp_path / "m.engine"
    _expect_one_line_error(["build", str(path), "-o", str(out), "--backend", RTX, f"--tokens={tokens}"], capsys, "--tokens")
    assert not out.exists()


def test_cli_plugin_missing(tmp_path, capsys):
    for op, domain in (("OmniSomethingElse", DOMAIN), ("FancyTopK", "com.example")):
        path = make_plugin_graph(tmp_path / f"{op}.onnx", topk_op=op, topk_domain=domain)
        out = tmp_path / f"{op}.engine"
        _expect_one_line_error(["build", str(path), "-o", str(out), "--backend", RTX], capsys, "plugin missing", f"{domain}::{op}")
        assert not out.exists()


def test_cli_unsupported_precision(exported, tmp_path, capsys):
    out = tmp_path / "x.engine"
    # TensorRT-RTX is strongly typed: a bf16 export cannot become an fp16 or fp32 engine.
    for precision in ("fp16", "fp32"):
        _expect_one_line_error(
            ["build", str(exported["layer-bf16"]), "-o", str(out), "--backend", RTX, "--precision", precision],
            capsys, "unsupported precision", "--dtype",
        )
    _expect_one_line_error(["build", str(exported["layer-fp32"]), "-o", str(out), "--backend", RTX, "--precision", "int8"], capsys, "int8")
    assert not out.exists()


def test_cli_malformed_onnx(tmp_path, capsys):
    out = tmp_path / "x.engine"
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07this is not a protobuf\xff\xff\xff")
    _expect_one_line_error(["build", str(garbage), "-o", str(out), "--backend", RTX], capsys, "not a valid ONNX model")
    _expect_one_line_error(["build", str(tmp_path / "missing.onnx"), "-o", str(out), "--backend", RTX], capsys, "not found")
    empty = tmp_path / "empty.onnx"
    onnx.save(helper.make_model(helper.make_graph([], "g", [], [])), str(empty))
    _expect_one_line_error(["build", str(empty), "-o", str(out), "--backend", RTX], capsys, "not a valid ONNX model")
    # Valid protobuf, but TensorRT's parser rejects the graph (MatMul shapes do not match).
    bad = make_plugin_graph(tmp_path / "bad.onnx")
    model = onnx.load(str(bad))
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(np.ones((3, 4), np.float32), "w_x"))
    onnx.save(model, str(bad))
    _expect_one_line_error(["build", str(bad), "-o", str(out), "--backend", RTX, "--plugins", "python"], capsys,
                           "TensorRT could not parse")
    # The native build reads the shapes first (to compile kernels for them): it stops there.
    _expect_one_line_error(["build", str(bad), "-o", str(out), "--backend", RTX], capsys, "shapes are inconsistent")
    assert not out.exists()


def test_cli_backend_not_installed(tmp_path, capsys):
    if "tensorrt" in trt_plugins._trt.available_backends():
        pytest.skip("tensorrt is installed here")
    path = make_plugin_graph(tmp_path / "m.onnx")
    _expect_one_line_error(["build", str(path), "-o", str(tmp_path / "m.engine"), "--backend", "tensorrt"], capsys,
                           "backend tensorrt is not installed")


# ------------------------------------------------------------------------------------------------
# The libtensorrt_rtx.so quirk (SPEC §4)
# ------------------------------------------------------------------------------------------------
def test_rtx_library_fix_in_place_is_idempotent(tmp_path):
    from trt_plugins import _trt

    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    for _ in range(2):
        assert _trt._fix_in_place(tmp_path)
    link = tmp_path / "libtensorrt_rtx.so"
    assert link.is_symlink() and os.readlink(link) == "libtensorrt_rtx.so.1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["libtensorrt_rtx.so", "libtensorrt_rtx.so.1"]


def test_rtx_library_fix_via_cache_dir_for_read_only_installs(tmp_path):
    """The fallback for a read-only site-packages: libraries loaded from a cache dir of symlinks.

    Runs in a fresh process (library loading is process-wide) with the fallback forced; the
    parser then adds plugin layers (the step that dlopens libtensorrt_rtx.so) and the engine
    builds, with exactly one copy of each TensorRT library mapped.
    """
    graph = make_plugin_graph(tmp_path / "m.onnx")
    script = textwrap.dedent(
        f"""
        import sys
        from trt_plugins import _trt
        from deploy.build import build_engine
        result = build_engine({str(graph)!r}, backend="tensorrt-rtx", tokens="1:4:16")
        assert len(result.plugin_layers) == 2 and len(result.engine) > 1000
        assert _trt.rtx_lib_fix.startswith("cache:"), _trt.rtx_lib_fix
        mapped = {{line.split()[-1] for line in open("/proc/self/maps") if "libtensorrt_rtx" in line}}
        assert len(mapped) == 1, mapped
        print("ok", _trt.rtx_lib_fix)
        """
    )
    env = dict(os.environ, OMNIMOE_TRT_RTX_LIBFIX="cache", OMNIMOE_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("ok cache:" + str(tmp_path / "cache"))
    farm = Path(proc.stdout.split("cache:", 1)[1].strip())
    assert (farm / "libtensorrt_rtx.so").is_symlink()


def test_default_namespace_aliases_build_the_same_engine(tmp_path):
    """The "" namespace aliases that register() adds for full TensorRT (older ONNX parsers look a
    custom node up by its plugin_namespace attribute, default "", only). Exercised on
    TensorRT-RTX in a fresh process: the parser, which tries "" first, then uses the aliases."""
    graph = make_plugin_graph(tmp_path / "m.onnx", gate="softmax")
    script = textwrap.dedent(
        f"""
        import trt_plugins
        from deploy.build import build_engine
        trt = trt_plugins.register(backend="tensorrt-rtx")
        trt_plugins.register_default_namespace_aliases(trt)
        trt_plugins.register_default_namespace_aliases(trt)  # idempotent
        names = [(c.name, c.plugin_namespace) for c in trt.get_plugin_registry().all_creators
                 if c.name.startswith("Omni")]
        assert sorted(names) == sorted([(op, ns) for op in ("OmniProductKeyTopK", "OmniExpertGroupedMatMul")
                                        for ns in ("omnimoe", "")]), names
        result = build_engine({str(graph)!r}, backend="tensorrt-rtx", tokens="1:4:16")
        layers = [(p, a) for _, p, a in result.plugin_layers]
        assert layers == [("OmniProductKeyTopK", {{"top_k": 3, "gate": "softmax"}}),
                          ("OmniExpertGroupedMatMul", {{"activation": "gelu_tanh"}})], layers
        assert b"omnimoe" in result.engine
        print("ok")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


class _FakeTrt:
    """Just enough of a TensorRT module for the precision planning (name, version, flags)."""

    class BuilderFlag:
        FP16 = "FP16"
        BF16 = "BF16"

    def __init__(self, name: str, version: str):
        self.__name__ = name
        self.__version__ = version


@pytest.mark.parametrize(
    "name,version,model,requested,expected",
    [
        # strongly typed backends: precision must match the ONNX types
        ("tensorrt_rtx", "1.7.1", "bf16", None, ("bf16", True)),
        ("tensorrt_rtx", "1.7.1", "fp16", "fp16", ("fp16", True)),
        ("tensorrt_rtx", "1.7.1", "fp32", "fp16", "unsupported precision"),
        ("tensorrt", "11.0.0", "fp32", "bf16", "unsupported precision"),
        # TensorRT 10.x: an fp32 model can be lowered with builder flags (weakly typed network)
        ("tensorrt", "10.3.0", "fp32", "fp16", ("fp16", False)),
        ("tensorrt", "10.13.0", "fp32", "bf16", ("bf16", False)),
        ("tensorrt", "10.13.0", "bf16", "bf16", ("bf16", True)),
        ("tensorrt", "10.13.0", "bf16", "fp16", "cannot lower"),
        ("tensorrt", "10.13.0", "fp16", "fp32", "cannot lower"),
    ],
)
def test_precision_plan_per_backend(name, version, model, requested, expected):
    fake = _FakeTrt(name, version)
    if isinstance(expected, tuple):
        assert build_mod._precision_plan(fake, model, requested) == expected
    else:
        with pytest.raises(OmniMoEInputError, match=expected):
            build_mod._precision_plan(fake, model, requested)


def test_onnx_precision_from_metadata_or_tensor_types(tmp_path):
    for dtype, expected in ((TensorProto.FLOAT, "fp32"), (TensorProto.FLOAT16, "fp16"), (TensorProto.BFLOAT16, "bf16")):
        model = onnx.load(str(make_plugin_graph(tmp_path / "m.onnx", dtype=dtype)))
        assert build_mod.onnx_precision(model) == expected
    helper.set_model_props(model, {"omnimoe.dtype": "fp16"})  # what omnimoe export records wins
    assert build_mod.onnx_precision(model) == "fp16"


@pytest.mark.parametrize(
    "found,gpu,expected",
    [
        (["tensorrt", "tensorrt-rtx"], True, "tensorrt"),
        (["tensorrt", "tensorrt-rtx"], False, "tensorrt-rtx"),
        (["tensorrt"], False, "tensorrt"),
        (["tensorrt-rtx"], True, "tensorrt-rtx"),
    ],
)
def test_auto_backend_choice(monkeypatch, found, gpu, expected):
    from trt_plugins import _trt

    monkeypatch.setattr(_trt, "available_backends", lambda: list(found))
    monkeypatch.setattr(_trt, "_cuda_visible", lambda: gpu)
    assert _trt.resolve_backend("auto") == expected
    monkeypatch.setattr(_trt, "available_backends", lambda: [])
    with pytest.raises(OmniMoEInputError, match="no TensorRT Python module"):
        _trt.resolve_backend("auto")


# ------------------------------------------------------------------------------------------------
# trtexec-style profiles and workspace limit (issue 13)
# ------------------------------------------------------------------------------------------------
def test_cli_several_profiles_with_batch_above_one(exported, tmp_path, capsys):
    engine = tmp_path / "multi.engine"
    argv = ["build", str(exported["layer-fp32"]), "-o", str(engine), "--backend", RTX, "--plugins", "python",
            "--no-progress", "--min-shapes", "x:1x1x32", "--opt-shapes", "x:4x64x32", "--max-shapes", "x:8x256x32",
            "--min-shapes", "x:1x1x32", "--opt-shapes", "x:1x1x32", "--max-shapes", "x:1x8x32",
            "--mem-pool-size", "workspace:64"]
    assert _cli(argv) == 0, capsys.readouterr().err
    assert "x (1, 1, 32)..(8, 256, 32); x (1, 1, 32)..(1, 8, 32)" in capsys.readouterr().out
    import json

    meta = json.loads(build_mod.sidecar_path(engine).read_text())
    assert meta["profiles"] == [{"x": [[1, 1, 32], [4, 64, 32], [8, 256, 32]]}, {"x": [[1, 1, 32], [1, 1, 32], [1, 8, 32]]}]


def test_plugin_workspace_at_the_profile_maximum_is_the_flattened_tokens(exported):
    from omnimoe.kernels import expert_workspace_bytes

    model = build_mod.load_onnx_header(exported["layer-fp32"])
    need, tokens = build_mod.plugin_workspace_bytes(model, [{"x": ((1, 1, 32), (2, 8, 32), (8, 256, 32))}])
    assert tokens == 8 * 256 and need == expert_workspace_bytes(8 * 256, 6, 64, 32)


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--min-shapes", "x:1x1x32", "--opt-shapes", "x:1x8x32"], "once per profile"),
        (["--min-shapes", "x1x1x32", "--opt-shapes", "x:1x8x32", "--max-shapes", "x:1x8x32"], "NAME:AxBxC"),
        (["--min-shapes", "x:1x9x32", "--opt-shapes", "x:1x8x32", "--max-shapes", "x:1x8x32"], "min <= opt <= max"),
        (["--min-shapes", "y:1x1x32", "--opt-shapes", "y:1x8x32", "--max-shapes", "y:1x8x32"], "no network input named y"),
        (["--min-shapes", "x:1x1x16", "--opt-shapes", "x:1x8x16", "--max-shapes", "x:1x8x16"], "input x has shape"),
        (["--mem-pool-size", "dlaSRAM:1"], "workspace:SIZE"),
        (["--mem-pool-size", "workspace:lots"], "needs a number"),
        (["--mem-pool-size", "workspace:0.0001"], "too small: the omnimoe plugins need"),
    ],
)
def test_cli_profile_and_pool_errors_are_one_line(exported, tmp_path, capsys, extra, needle):
    engine = tmp_path / "e.engine"
    argv = ["build", str(exported["layer-fp32"]), "-o", str(engine), "--backend", RTX, "--plugins", "python", *extra]
    _expect_one_line_error(argv, capsys, needle)
    assert not engine.exists()
