"""`omnimoe inspect` on a checkpoint, both ONNX graphs and an engine with its build record (issue 13 item 6)."""
from __future__ import annotations

import json

import pytest
import torch

from omnimoe.models import TinyOmniLM
from omnimoe.train import tiny_config
from test_parity import make_layer_ckpt, run_cli
from test_sharded import write_sharded


def inspect(path, capsys, *extra):
    code, out, err = run_cli(["inspect", path, "--json", *extra], capsys)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from deploy.cli import main as cli

    root = tmp_path_factory.mktemp("inspect")
    layer = make_layer_ckpt(root / "ckpt")
    for ops in ("plugin", "standard"):
        assert cli(["export", str(root / "ckpt"), "-o", str(root / f"{ops}.onnx"), "--ops", ops]) == 0
    torch.manual_seed(0)
    TinyOmniLM(tiny_config("abcdefghij ")).eval().save_pretrained(root / "lm")
    assert cli(["export", str(root / "lm"), "-o", str(root / "lm.onnx"), "--dtype", "fp16"]) == 0
    return root, layer


def test_inspect_checkpoint(artifacts, capsys, tmp_path):
    root, layer = artifacts
    info = inspect(root / "ckpt", capsys)
    assert info["kind"] == "checkpoint" and info["config"] == layer.config.to_dict()
    assert info["tensors"]["up_embed.weight"] == {"shape": [36, 16], "dtype": "F32", "file": "model.safetensors"}
    assert info["parameters"] == sum(p.numel() for p in layer.parameters())
    assert info["precision"] == ["fp32"]
    assert info["inputs"] == [{"name": "x", "dtype": "float", "shape": ["batch", "seq", 16]}]
    assert "omnimoe" in info["tools"] and "onnx" in info["tools"]
    # A sharded checkpoint lists its shards and the index.
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((root / "ckpt" / "config.json").read_text())
    write_sharded(shard_dir, layer.state_dict(), 2)
    info = inspect(shard_dir, capsys)
    assert info["weights"]["index"] == "model.safetensors.index.json" and len(info["weights"]["files"]) == 2
    assert info["parameters"] == sum(p.numel() for p in layer.parameters())
    code, out, _ = run_cli(["inspect", root / "ckpt"], capsys)
    assert code == 0 and "num_experts=36" in out and "up_embed.weight F32 [36, 16]" in out


def test_inspect_both_onnx_graphs(artifacts, capsys):
    root, layer = artifacts
    plugin = inspect(root / "plugin.onnx", capsys)
    assert plugin["graph"] == "plugin" and plugin["precision"] == "fp32"
    assert plugin["metadata"]["omnimoe.ops"] == "plugin" and plugin["metadata"]["omnimoe.config"] == layer.config.to_dict()
    assert plugin["metadata"]["omnimoe.version"]
    nodes = {n["op_type"]: n["attributes"] for n in plugin["custom_nodes"]}
    assert nodes == {"OmniProductKeyTopK": {"top_k": 4, "gate": "product", "plugin_namespace": "omnimoe"},
                     "OmniExpertGroupedMatMul": {"activation": "silu", "plugin_namespace": "omnimoe"}}
    assert plugin["ops"]["omnimoe::OmniProductKeyTopK"] == 1 and plugin["opsets"]["omnimoe"] == 1
    assert plugin["inputs"] == [{"name": "x", "dtype": "float", "shape": ["batch", "seq", 16]}]
    assert plugin["dynamic_axes"] == {"x": {"0": "batch", "1": "seq"}, "y": {"0": "batch", "1": "seq"}}
    standard = inspect(root / "standard.onnx", capsys)
    assert standard["graph"] == "standard" and not standard["custom_nodes"] and standard["ops"]["TopK"] >= 3
    assert not any(op.startswith("omnimoe::") for op in standard["ops"])
    lm = inspect(root / "lm.onnx", capsys)
    assert lm["precision"] == "fp16" and lm["inputs"][0] == {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    assert len(lm["custom_nodes"]) == 4 and lm["weights"]["by_dtype"]["float16"] > 0
    code, out, _ = run_cli(["inspect", root / "plugin.onnx"], capsys)
    assert code == 0 and "omnimoe::OmniProductKeyTopK" in out and "top_k=4" in out and "dynamic axes" in out


def test_inspect_engine_reads_the_build_record(tmp_path, capsys):
    engine = tmp_path / "layer.engine"
    engine.write_bytes(b"\0" * 1024)  # engines cannot be deserialized here; only the record is read
    info = inspect(engine, capsys)
    assert info["build_record"] is None and "GPU" in info["note"]
    record = {"omnimoe_version": "0.1.0", "backend": "tensorrt-rtx", "backend_version": "1.7.1", "precision": "fp16",
              "profiles": {"x": [[1, 1, 16], [1, 256, 16], [4, 4096, 16]]}, "plugins": "native",
              "plugin_library": "libomnimoe_trt_plugins.so", "sms": [80, 86, 90], "plugin_layers": ["topk", "experts"],
              "onnx": "layer.onnx", "future_key": 1}
    (tmp_path / "layer.engine.json").write_text(json.dumps(record))
    info = inspect(engine, capsys)
    assert {k: info[k] for k in record if k != "future_key"} == {k: v for k, v in record.items() if k != "future_key"}
    assert info["other_recorded"] == {"future_key": 1} and info["bytes"] == 1024
    code, out, _ = run_cli(["inspect", engine], capsys)
    assert code == 0 and "SMs 80, 86, 90" in out and "libomnimoe_trt_plugins.so" in out and "[4, 4096, 16]" in out
    # Records from older builds lack keys: shown as unknown, not an error.
    (tmp_path / "layer.engine.json").write_text(json.dumps({"backend": "tensorrt"}))
    code, out, _ = run_cli(["inspect", engine], capsys)
    assert code == 0 and "precision unknown" in out and "profiles unknown" in out


def test_inspect_an_engine_omnimoe_build_made(artifacts, tmp_path, capsys):
    """TensorRT-RTX builds without a GPU: the record `omnimoe build` writes is what inspect shows."""
    root, _ = artifacts
    code, _, err = run_cli(["build", root / "plugin.onnx", "-o", tmp_path / "layer.engine", "--plugins", "python",
                            "--tokens", "1:64:512"], capsys)
    assert code == 0, err
    info = inspect(tmp_path / "layer.engine", capsys)
    assert info["build_record"] == "layer.engine.json" and info["plugins"] == "python"
    profiles = info["profiles"] if isinstance(info["profiles"], list) else [info["profiles"]]  # one profile or several
    assert profiles == [{"x": [[1, 1, 16], [1, 64, 16], [1, 512, 16]]}]
    assert sorted(layer["plugin"] for layer in info["plugin_layers"]) == ["OmniExpertGroupedMatMul", "OmniProductKeyTopK"]
    code, out, _ = run_cli(["inspect", tmp_path / "layer.engine"], capsys)
    assert code == 0 and "input x float [?, ?, 16]" in out and "OmniProductKeyTopK (" in out and "top_k=4" in out
    assert "profile 0 x: min / opt / max [1, 1, 16] / [1, 64, 16] / [1, 512, 16]" in out


def test_inspect_bad_input_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"\x01garbage")
    (tmp_path / "x.engine").write_bytes(b"x")
    (tmp_path / "x.engine.json").write_text("{")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    for path in ("missing.onnx", "junk.onnx", "x.engine", "notes.txt", "empty"):
        code, out, err = run_cli(["inspect", tmp_path / path], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and not out, (path, err)
