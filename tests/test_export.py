"""ONNX export (issue 4): PyTorch vs ONNX Runtime standard graph vs ONNX Runtime plugin graph.

Exports are slow-ish (seconds), so every model is exported once per module (module-scoped
fixtures) and the parity cases reuse the files and sessions.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploy.cli import main as cli_main
from export import onnx_export
from export.onnx_export import export_onnx
from export.ort import ort_session
from omnimoe.checkpoint import load_checkpoint
from omnimoe.config import OmniMoEConfig
from omnimoe.layer import OmniMoELayer
from omnimoe.models import TinyOmniLM, TinyOmniLMConfig

REPO = Path(__file__).resolve().parents[1]
ATOL = RTOL = 1e-5  # fp32 parity tolerance (issue 4)
LAYER_AXES = ({0: "batch", 1: "seq"},)

# (gate, router_norm, activation, top_k): both gate modes x batchnorm on/off; K below and above
# the grid side s = 8 (the exact top-K takes min(K, s) per axis); every activation once.
LAYER_VARIANTS = {
    "product-bn": ("product", "batchnorm", "silu", 6),
    "softmax-bn": ("softmax", "batchnorm", "gelu", 12),
    "product-nonorm": ("product", "none", "gelu_tanh", 12),
    "softmax-nonorm": ("softmax", "none", "relu", 6),
}


def make_layer(gate: str, router_norm: str, act: str, top_k: int, seed: int = 0) -> OmniMoELayer:
    torch.manual_seed(seed)
    config = OmniMoEConfig(
        hidden_size=32, num_experts=64, top_k=top_k, intermediate_size=48, hidden_act=act, router_norm=router_norm, gate=gate
    )
    layer = OmniMoELayer(config).eval()
    with torch.no_grad():
        # Sharper routing than the default init, and non-trivial batch-norm statistics.
        layer.router_gate_x.weight.mul_(4.0)
        layer.router_gate_y.weight.mul_(4.0)
        if router_norm == "batchnorm":
            for bn in (layer.router_norm_x, layer.router_norm_y):
                bn.running_mean.normal_(0.0, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
    return layer


def export_pair(model, directory: Path, example_inputs, input_names, output_names, **kwargs) -> dict[str, Path]:
    """Export the plugin graph and the standard twin of `model`; return {ops: path}."""
    paths = {}
    for ops in ("plugin", "standard"):
        path = directory / f"{ops}.onnx"
        export_onnx(
            model,
            path,
            example_inputs=example_inputs,
            ops=ops,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=LAYER_AXES,
            **kwargs,
        )
        paths[ops] = path
    return paths


def assert_parity(expected: np.ndarray, outputs: dict[str, np.ndarray], atol=ATOL, rtol=RTOL) -> None:
    for name, got in outputs.items():
        assert got.shape == expected.shape, f"{name}: shape {got.shape} != {expected.shape}"
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol, err_msg=f"{name} vs PyTorch")


def run_sessions(sessions: dict, feed_name: str, value: np.ndarray) -> dict[str, np.ndarray]:
    return {f"onnxruntime-{ops}": s.run(None, {feed_name: value})[0] for ops, s in sessions.items()}


# ------------------------------------------------------------------------------------------------
# Layer
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(LAYER_VARIANTS))
def layer_export(request, tmp_path_factory):
    layer = make_layer(*LAYER_VARIANTS[request.param])
    directory = tmp_path_factory.mktemp(f"layer-{request.param}")
    paths = export_pair(layer, directory, (torch.zeros(2, 3, 32),), ["x"], ["y"])
    sessions = {ops: ort_session(p) for ops, p in paths.items()}
    return layer, paths, sessions


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("tokens", [1, 37, 512])
def test_layer_parity_torch_vs_ort_standard_vs_ort_plugin(layer_export, tokens, batch):
    layer, _, sessions = layer_export
    x = torch.randn(batch, tokens, 32, generator=torch.Generator().manual_seed(tokens * 10 + batch))
    with torch.no_grad():
        expected = layer(x).numpy()
    assert_parity(expected, run_sessions(sessions, "x", x.numpy()))


@pytest.mark.parametrize("shape", [(0, 5, 32), (2, 0, 32)], ids=["batch0", "seq0"])
def test_layer_zero_tokens(layer_export, shape):
    layer, _, sessions = layer_export
    x = torch.zeros(shape)
    with torch.no_grad():
        expected = layer(x).numpy()
    assert expected.shape == shape
    assert_parity(expected, run_sessions(sessions, "x", x.numpy()))


def _value_types(path: Path) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    types.update({i.name: i.data_type for i in inferred.graph.initializer})
    return types


def check_plugin_nodes(path: Path, layers: list[tuple[str, OmniMoEConfig]]) -> None:
    """The plugin graph against SPEC §3, written out literally here (not read from export.schemas)."""
    model = onnx.load(str(path))
    assert {(o.domain, o.version) for o in model.opset_import if o.domain == "omnimoe"} == {("omnimoe", 1)}
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert [(n.domain, n.op_type) for n in custom] == [
        ("omnimoe", "OmniProductKeyTopK"),
        ("omnimoe", "OmniExpertGroupedMatMul"),
    ] * len(layers)
    initializers = {i.name: i for i in model.graph.initializer}
    types = _value_types(path)
    for (prefix, config), topk, experts in zip(layers, custom[0::2], custom[1::2]):
        attrs = {a.name: a for a in topk.attribute}
        assert set(attrs) == {"top_k", "gate", "plugin_namespace"}
        assert attrs["plugin_namespace"].s == b"omnimoe"  # TensorRT 10.3's parser looks plugins up by it
        assert attrs["top_k"].type == onnx.AttributeProto.INT and attrs["top_k"].i == config.top_k
        assert attrs["gate"].type == onnx.AttributeProto.STRING and attrs["gate"].s.decode() == config.gate
        assert len(topk.input) == 2 and len(topk.output) == 2
        assert types[topk.input[0]] == types[topk.input[1]] == onnx.TensorProto.FLOAT
        assert types[topk.output[0]] == onnx.TensorProto.FLOAT
        assert types[topk.output[1]] == onnx.TensorProto.INT32

        attrs = {a.name: a for a in experts.attribute}
        assert set(attrs) == {"activation", "plugin_namespace"}
        assert attrs["plugin_namespace"].s == b"omnimoe"
        assert attrs["activation"].type == onnx.AttributeProto.STRING
        assert attrs["activation"].s.decode() == config.hidden_act
        assert len(experts.input) == 5 and len(experts.output) == 1
        # gates and int32 indices come straight from the top-K node.
        assert list(experts.input[3:]) == list(topk.output)
        # Expert tables are initializers with the module's parameter names, [N, d].
        assert list(experts.input[1:3]) == [f"{prefix}up_embed.weight", f"{prefix}down_embed.weight"]
        for name in experts.input[1:3]:
            assert list(initializers[name].dims) == [config.num_experts, config.hidden_size]
        assert types[experts.output[0]] == types[experts.input[0]]


def test_layer_plugin_graph_matches_spec(layer_export):
    layer, paths, _ = layer_export
    check_plugin_nodes(paths["plugin"], [("", layer.config)])
    model = onnx.load(str(paths["plugin"]))
    [x] = model.graph.input
    assert x.name == "x" and [d.dim_param for d in x.type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    assert x.type.tensor_type.shape.dim[2].dim_value == 32
    assert [o.name for o in model.graph.output] == ["y"]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata[onnx_export.METADATA_OPS] == "plugin" and metadata[onnx_export.METADATA_DTYPE] == "fp32"


def test_layer_standard_graph_has_only_standard_ops(layer_export):
    _, paths, _ = layer_export
    model = onnx.load(str(paths["standard"]))
    op_types = {n.op_type for n in model.graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert {"TopK", "Gather", "MatMul"} <= op_types
    # The twin reads the same, readably named expert tables.
    names = {i.name for i in model.graph.initializer}
    assert {"up_embed.weight", "down_embed.weight"} <= names


def test_both_graphs_pass_checker_and_strict_shape_inference(layer_export):
    _, paths, _ = layer_export
    for path in paths.values():
        onnx_export.check_onnx_file(path)  # raises on failure


def test_perturbed_expert_row_fails_the_comparison(tmp_path):
    """One changed row of one expert table that a token routes to must break parity."""
    layer = make_layer(*LAYER_VARIANTS["product-bn"])
    x = torch.randn(3, 37, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = layer(x).numpy()
        _, indices = layer.route(x.reshape(-1, 32))
        expert = int(indices[0, 0])
        layer.down_embed.weight[expert] += 0.05
    paths = export_pair(layer, tmp_path, (torch.zeros(2, 3, 32),), ["x"], ["y"])
    outputs = run_sessions({ops: ort_session(p) for ops, p in paths.items()}, "x", x.numpy())
    for name, got in outputs.items():
        with pytest.raises(AssertionError):
            assert_parity(expected, {name: got})
    # ... while the perturbed model itself still matches its exports.
    with torch.no_grad():
        assert_parity(layer(x).numpy(), outputs)


class _TopKOnly(torch.nn.Module):
    def __init__(self, top_k: int, gate: str):
        super().__init__()
        self.top_k, self.gate = top_k, gate

    def forward(self, log_probs_x, log_probs_y):
        from omnimoe import custom_ops  # noqa: F401

        return torch.ops.omnimoe.product_key_topk(log_probs_x, log_probs_y, self.top_k, self.gate)


@pytest.mark.parametrize("top_k", [5, 20])  # below and above the grid side s = 8
@pytest.mark.parametrize("gate", ["product", "softmax"])
def test_topk_both_graphs_match_reference_on_exact_ties(tmp_path, top_k, gate):
    """Integer-valued log-probs make many candidate sums exactly equal: both graphs must pick
    the same experts in the same order as the reference (smaller expert index first)."""
    from omnimoe.ops import product_key_topk_reference

    gen = torch.Generator().manual_seed(top_k)
    px = torch.randint(-3, 1, (200, 8), generator=gen).float()
    py = torch.randint(-3, 1, (200, 8), generator=gen).float()
    gates_ref, idx_ref = product_key_topk_reference(px, py, top_k, gate)
    module = _TopKOnly(top_k, gate)
    for ops in ("plugin", "standard"):
        path = tmp_path / f"{ops}.onnx"
        export_onnx(
            module,
            path,
            example_inputs=(torch.zeros(4, 8), torch.zeros(4, 8)),
            ops=ops,
            input_names=["log_probs_x", "log_probs_y"],
            output_names=["gates", "indices"],
            dynamic_shapes=({0: "tokens"}, {0: "tokens"}),
        )
        gates, idx = ort_session(path).run(None, {"log_probs_x": px.numpy(), "log_probs_y": py.numpy()})
        assert idx.dtype == np.int32
        np.testing.assert_array_equal(idx, idx_ref.numpy(), err_msg=ops)
        np.testing.assert_allclose(gates, gates_ref.numpy(), atol=ATOL, rtol=RTOL, err_msg=ops)


# ------------------------------------------------------------------------------------------------
# TinyOmniLM: the trained model, and untrained variants covering the other gate / norm modes
# ------------------------------------------------------------------------------------------------
def _lm_variant(name: str) -> TinyOmniLM:
    if name == "trained":
        from omnimoe.train import train_tiny

        # A short run: the batch-norm statistics, router and tables are trained, not initial.
        result = train_tiny(steps=30, log=lambda _: None)
        assert result.loss_after < result.loss_before
        return result.model.eval()
    gate, router_norm = name.split("-")
    torch.manual_seed(1)
    moe = OmniMoEConfig(
        hidden_size=32, num_experts=64, top_k=5, intermediate_size=48, gate=gate, router_norm="none" if router_norm == "nonorm" else "batchnorm"
    )
    model = TinyOmniLM(TinyOmniLMConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, max_seq_len=512, moe=moe))
    with torch.no_grad():
        for layer in model.omnimoe_layers():
            if moe.router_norm == "batchnorm":
                for bn in (layer.router_norm_x, layer.router_norm_y):
                    bn.running_mean.normal_(0.0, 0.5)
                    bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


# The trained model's position table has 64 entries, so its longest sequence is 64; the
# max_seq_len=512 variants cover T = 512.
LM_VARIANTS = {
    "trained": [1, 37, 64],
    "softmax-bn": [1, 37, 512],
    "product-nonorm": [1, 37, 512],
    "softmax-nonorm": [1, 37, 512],
}


@pytest.fixture(scope="module", params=list(LM_VARIANTS))
def lm_export(request, tmp_path_factory):
    model = _lm_variant(request.param)
    directory = tmp_path_factory.mktemp(f"lm-{request.param}")
    paths = export_pair(model, directory, (torch.zeros(2, 3, dtype=torch.long),), ["input_ids"], ["logits"])
    sessions = {ops: ort_session(p) for ops, p in paths.items()}
    return request.param, model, paths, sessions


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("length_slot", [0, 1, 2])
def test_lm_parity_torch_vs_ort_standard_vs_ort_plugin(lm_export, length_slot, batch):
    name, model, _, sessions = lm_export
    tokens = LM_VARIANTS[name][length_slot]
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(tokens + batch))
    with torch.no_grad():
        expected = model(ids).numpy()
    assert_parity(expected, run_sessions(sessions, "input_ids", ids.numpy()))


def test_lm_plugin_graph_matches_spec(lm_export):
    _, model, paths, _ = lm_export
    check_plugin_nodes(paths["plugin"], [(f"layers.{i}.moe.", layer.config) for i, layer in enumerate(model.omnimoe_layers())])
    graph = onnx.load(str(paths["plugin"])).graph
    assert [i.name for i in graph.input] == ["input_ids"]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert [o.name for o in graph.output] == ["logits"]


# ------------------------------------------------------------------------------------------------
# dtypes, opset, external data, atomic writes
# ------------------------------------------------------------------------------------------------
def test_fp16_plugin_and_standard_graphs_agree_in_onnxruntime(tmp_path):
    layer = make_layer(*LAYER_VARIANTS["softmax-bn"])
    paths = export_pair(layer, tmp_path, (torch.zeros(2, 3, 32),), ["x"], ["y"], dtype="fp16")
    for path in paths.values():
        model = onnx.load(str(path))
        inits = {i.name: i.data_type for i in model.graph.initializer}
        assert inits["up_embed.weight"] == inits["down_embed.weight"] == onnx.TensorProto.FLOAT16
        # batch-norm statistics stay float32 in fp16 graphs
        assert inits["router_norm_x.running_mean"] == inits["router_norm_y.running_mean"] == onnx.TensorProto.FLOAT
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    x = torch.randn(3, 37, 32, generator=torch.Generator().manual_seed(3)).half().numpy()
    outputs = run_sessions({ops: ort_session(p) for ops, p in paths.items()}, "x", x)
    assert all(o.dtype == np.float16 for o in outputs.values())
    # Same router ops in the same runtime -> same routing; the expert op differs only in
    # summation order before rounding to fp16.
    np.testing.assert_allclose(
        outputs["onnxruntime-plugin"].astype(np.float32), outputs["onnxruntime-standard"].astype(np.float32), atol=2e-3, rtol=2e-3
    )
    # The layer itself was restored to float32 after the fp16 export.
    assert layer.up_embed.weight.dtype == torch.float32


def test_bf16_graphs_export_and_check(tmp_path):
    layer = make_layer(*LAYER_VARIANTS["product-bn"])
    paths = export_pair(layer, tmp_path, (torch.zeros(2, 3, 32),), ["x"], ["y"], dtype="bf16")
    for path in paths.values():
        model = onnx.load(str(path))
        inits = {i.name: i.data_type for i in model.graph.initializer}
        assert inits["up_embed.weight"] == onnx.TensorProto.BFLOAT16
        assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    check_plugin_nodes(paths["plugin"], [("", layer.config)])


def test_opset_18_export_runs(tmp_path):
    layer = make_layer(*LAYER_VARIANTS["softmax-nonorm"])
    paths = export_pair(layer, tmp_path, (torch.zeros(2, 3, 32),), ["x"], ["y"], opset=18)
    for path in paths.values():
        model = onnx.load(str(path))
        assert {o.domain: o.version for o in model.opset_import}[""] == 18
    x = torch.randn(1, 37, 32)
    with torch.no_grad():
        expected = layer(x).numpy()
    assert_parity(expected, run_sessions({ops: ort_session(p) for ops, p in paths.items()}, "x", x.numpy()))


def test_external_data_written_streamed_and_loadable(tmp_path):
    layer = make_layer(*LAYER_VARIANTS["product-bn"])
    paths = export_pair(layer, tmp_path, (torch.zeros(2, 3, 32),), ["x"], ["y"], external_data=True)
    for ops, path in paths.items():
        data = path.with_name(path.name + ".data")
        assert data.is_file()
        model = onnx.load(str(path), load_external_data=False)
        up = next(i for i in model.graph.initializer if i.name == "up_embed.weight")
        info = {e.key: e.value for e in up.external_data}
        assert up.data_location == onnx.TensorProto.EXTERNAL and info["location"] == data.name
        assert int(info["offset"]) % 4096 == 0
        raw = np.fromfile(data, dtype=np.float32, count=64 * 32, offset=int(info["offset"])).reshape(64, 32)
        np.testing.assert_array_equal(raw, layer.up_embed.weight.detach().numpy())
    x = torch.randn(3, 37, 32)
    with torch.no_grad():
        expected = layer(x).numpy()
    assert_parity(expected, run_sessions({ops: ort_session(p) for ops, p in paths.items()}, "x", x.numpy()))


def test_failed_export_leaves_no_files(tmp_path, monkeypatch):
    layer = make_layer(*LAYER_VARIANTS["product-bn"])

    def failing_check(path):
        raise RuntimeError("simulated checker failure")

    monkeypatch.setattr(onnx_export, "check_onnx_file", failing_check)
    with pytest.raises(RuntimeError, match="simulated"):
        export_onnx(layer, tmp_path / "m.onnx", example_inputs=(torch.zeros(2, 3, 32),), external_data=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layer_checkpoint(tmp_path_factory):
    layer = make_layer(*LAYER_VARIANTS["softmax-bn"])
    directory = tmp_path_factory.mktemp("ckpt") / "layer"
    layer.save_pretrained(directory)
    return directory


def test_cli_export_layer_checkpoint_subprocess(layer_checkpoint, tmp_path):
    out = tmp_path / "layer.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "export", str(layer_checkpoint), "-o", str(out), "--ops", "plugin"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    layer = load_checkpoint(layer_checkpoint)
    check_plugin_nodes(out, [("", layer.config)])
    x = torch.randn(3, 37, 32)
    with torch.no_grad():
        expected = layer(x).numpy()
    assert_parity(expected, run_sessions({"plugin": ort_session(out)}, "x", x.numpy()))


def test_cli_export_lm_checkpoint_standard(tmp_path):
    model = _lm_variant("softmax-bn")
    model.save_pretrained(tmp_path / "lm")
    out = tmp_path / "out" / "lm.onnx"
    assert cli_main(["export", str(tmp_path / "lm"), "-o", str(out), "--ops", "standard", "--external-data", "always"]) == 0
    assert out.is_file() and out.with_name("lm.onnx.data").is_file()
    ids = torch.randint(0, 40, (3, 37))
    with torch.no_grad():
        expected = load_checkpoint(tmp_path / "lm")(ids).numpy()
    assert_parity(expected, run_sessions({"standard": ort_session(out)}, "input_ids", ids.numpy()))


@pytest.mark.parametrize(
    "argv_tail",
    [
        ["--ops", "plugin"],  # checkpoint directory does not exist
        ["--opset", "7"],
        ["--dtype", "fp8"],
    ],
    ids=["missing-checkpoint", "bad-opset", "bad-dtype"],
)
def test_cli_bad_input_exits_2_with_one_line(argv_tail, layer_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "nope" if argv_tail[0] == "--ops" else layer_checkpoint
    out = tmp_path / "m.onnx"
    try:
        rc = cli_main(["export", str(ckpt), "-o", str(out), *argv_tail])
    except SystemExit as e:  # argparse choice errors exit from the parser
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "error" in err
    assert not out.exists() and not out.with_name("m.onnx.data").exists()


def test_cli_rejects_output_without_onnx_suffix(layer_checkpoint, tmp_path, capsys):
    assert cli_main(["export", str(layer_checkpoint), "-o", str(tmp_path / "model.bin")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_unwritable_output_exits_2_with_one_line(layer_checkpoint, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    rc = cli_main(["export", str(layer_checkpoint), "-o", str(blocker / "m.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "a_file is not a directory" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_more_than_2gib_without_external_data_is_refused_before_tracing():
    from omnimoe.errors import OmniMoEInputError

    with torch.device("meta"):  # shapes only: 2 x 2^20 x 1024 fp32 tables, nothing allocated
        big = OmniMoELayer(OmniMoEConfig(hidden_size=1024, num_experts=1 << 20, top_k=16))
    assert onnx_export.estimated_weight_bytes(big, "fp16") > 4 * 2**30
    with pytest.raises(OmniMoEInputError, match="external data"):
        onnx_export.check_external_data_choice(big, "fp16", external_data=False)
    onnx_export.check_external_data_choice(big, "fp16", external_data=None)  # auto: allowed


class _BypassingLayer(OmniMoELayer):
    """Computes the layer with the reference functions directly, skipping the custom-op dispatch."""

    def forward(self, x):
        x2 = x.reshape(-1, self.config.hidden_size)
        px, py = self.router_log_probs(x2)
        scores, indices = torch.topk((px[:, :, None] + py[:, None, :]).flatten(1), self.config.top_k)
        h = torch.nn.functional.silu(torch.einsum("tkd,td->tk", self.up_embed.weight[indices], x2)) * scores.exp()
        return torch.einsum("tk,tkd->td", h, self.down_embed.weight[indices]).reshape(x.shape)


def test_plugin_export_refuses_a_graph_without_the_custom_nodes(tmp_path):
    layer = _BypassingLayer(OmniMoEConfig(hidden_size=32, num_experts=64, top_k=4)).eval()
    with pytest.raises(RuntimeError, match="expected one pair per layer"):
        export_onnx(layer, tmp_path / "m.onnx", example_inputs=(torch.zeros(2, 3, 32),), ops="plugin")
    assert list(tmp_path.iterdir()) == []
