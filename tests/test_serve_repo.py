"""`omnimoe serve-repo`: a Triton Inference Server model repository from an engine `omnimoe build`
made with native plugins (issue 10 item 4). Engines are real (TensorRT-RTX builds without a GPU);
the generated config.pbtxt is parsed with Triton's own `model_config.proto` (tritonclient)."""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from omnimoe import OmniMoEConfig, OmniMoELayer
from omnimoe.models import TinyOmniLM
from omnimoe.train import tiny_config
from test_parity import run_cli

LIB = "libomnimoe_trt_plugins.so"


def model_config_pb2():
    """Triton's ModelConfig protobuf module. `tritonclient[grpc]` imports it as below; a tritonclient
    installed without its grpc extra ships the same generated module, which needs only protobuf."""
    try:
        from tritonclient.grpc import model_config_pb2 as module

        return module
    except (ImportError, RuntimeError):
        import tritonclient

        path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


def parse_config(path: Path):
    from google.protobuf import text_format

    pb2 = model_config_pb2()
    return pb2, text_format.Parse(path.read_text(), pb2.ModelConfig())


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A layer engine (fp32), a TinyOmniLM engine (fp16, int64 input), both native for sm 90, and a
    Python-plugin layer engine."""
    from deploy.cli import main as cli

    root = tmp_path_factory.mktemp("serve_repo")
    torch.manual_seed(0)
    OmniMoELayer(OmniMoEConfig(hidden_size=64, intermediate_size=128, num_experts=256, top_k=8)).eval().save_pretrained(
        root / "ckpt")
    assert cli(["export", str(root / "ckpt"), "-o", str(root / "layer.onnx")]) == 0
    assert cli(["build", str(root / "layer.onnx"), "-o", str(root / "eng" / "layer.engine"), "--sm", "90",
                "--tokens", "1:64:512", "--no-progress"]) == 0
    torch.manual_seed(0)
    TinyOmniLM(tiny_config("abcdefghij ")).eval().save_pretrained(root / "lm")
    assert cli(["export", str(root / "lm"), "-o", str(root / "lm.onnx"), "--dtype", "fp16"]) == 0
    assert cli(["build", str(root / "lm.onnx"), "-o", str(root / "lm_eng" / "lm.engine"), "--sm", "90",
                "--tokens", "1:16:64", "--no-progress"]) == 0
    assert cli(["build", str(root / "layer.onnx"), "-o", str(root / "py" / "layer.engine"), "--plugins", "python",
                "--no-progress"]) == 0
    # Two profiles, the first with a batch range: what Triton's own batching needs.
    assert cli(["build", str(root / "layer.onnx"), "-o", str(root / "batched" / "layer.engine"), "--sm", "90",
                "--no-progress", "--min-shapes", "x:1x1x64", "--opt-shapes", "x:4x16x64", "--max-shapes", "x:8x64x64",
                "--min-shapes", "x:1x1x64", "--opt-shapes", "x:1x64x64", "--max-shapes", "x:1x512x64"]) == 0
    return root


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def expect_one_line_error(args, capsys, *needles) -> str:
    code, _, err = run_cli(args, capsys)
    err = err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_layer_repository(engines, tmp_path, capsys):
    engine = engines / "eng" / "layer.engine"
    repo = tmp_path / "repo"
    code, out, err = run_cli(["serve-repo", engine, "-o", repo], capsys)
    assert code == 0, err
    assert files_under(repo) == sorted(["layer", "layer/1", "layer/1/model.plan", f"layer/{LIB}", "layer/README.md",
                                        "layer/config.pbtxt"])
    pb2, config = parse_config(repo / "layer" / "config.pbtxt")
    assert config.name == "layer" and config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("x", pb2.TYPE_FP32, [1, -1, 64])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("y", pb2.TYPE_FP32, [-1, -1, 64])]
    assert config.instance_group[0].kind == pb2.ModelInstanceGroup.KIND_GPU
    # The plan and the plugin library are the ones omnimoe build wrote.
    assert (repo / "layer" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert (repo / "layer" / LIB).read_bytes() == (engine.parent / LIB).read_bytes()
    line = (f"tritonserver --model-repository={repo.resolve()} "
            f"--backend-config=tensorrt,plugins={(repo / 'layer' / LIB).resolve()}")
    readme = (repo / "layer" / "README.md").read_text()
    assert line in readme.splitlines() and line in out.splitlines()[-1]
    assert "LD_PRELOAD=" not in readme  # loads the library before TensorRT: it could not register then
    # Built by TensorRT-RTX: the user is told the plan must come from the server's TensorRT.
    assert "TensorRT-RTX" in err and "own TensorRT version" in readme
    assert "[1, 1, 64] .. [1, 512, 64]" in readme


def test_lm_repository_int64_and_fp16(engines, tmp_path, capsys):
    engine = engines / "lm_eng" / "lm.engine"
    io = {t["name"]: t for t in json.loads(engine.with_name("lm.engine.json").read_text())["io"]}
    vocab = io["logits"]["shape"][-1]
    assert vocab == len("abcdefghij ")
    repo = tmp_path / "repo"
    code, _, err = run_cli(["serve-repo", engine, "-o", repo, "--name", "tiny-lm"], capsys)
    assert code == 0, err
    pb2, config = parse_config(repo / "tiny-lm" / "config.pbtxt")
    assert config.name == "tiny-lm" and config.platform == "tensorrt_plan"
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [("input_ids", pb2.TYPE_INT64, [1, -1])]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [("logits", pb2.TYPE_FP16, [-1, -1, vocab])]
    assert (repo / "tiny-lm" / "1" / "model.plan").is_file() and (repo / "tiny-lm" / LIB).is_file()


def test_max_batch_size(engines, tmp_path, capsys):
    """omnimoe build pins the batch axis to 1: Triton may own that axis with max_batch_size 1, not more."""
    engine = engines / "eng" / "layer.engine"
    repo = tmp_path / "repo"
    code, _, err = run_cli(["serve-repo", engine, "-o", repo, "--max-batch-size", "1"], capsys)
    assert code == 0, err
    pb2, config = parse_config(repo / "layer" / "config.pbtxt")
    assert config.max_batch_size == 1
    assert [list(t.dims) for t in config.input] == [[-1, 64]] and [list(t.dims) for t in config.output] == [[-1, 64]]
    bad = tmp_path / "bad"
    expect_one_line_error(["serve-repo", engine, "-o", bad, "--max-batch-size", "4"], capsys, "1..1", "--max-batch-size 0")
    expect_one_line_error(["serve-repo", engine, "-o", bad, "--max-batch-size", "-1"], capsys, ">= 0")
    assert not bad.exists()


def test_several_profiles_and_triton_batching(engines, tmp_path, capsys):
    engine = engines / "batched" / "layer.engine"
    repo = tmp_path / "repo"
    code, _, err = run_cli(["serve-repo", engine, "-o", repo], capsys)
    assert code == 0, err
    _, config = parse_config(repo / "layer" / "config.pbtxt")
    assert config.max_batch_size == 0 and [list(t.dims) for t in config.input] == [[-1, -1, 64]]
    assert list(config.instance_group[0].profile) == ["0", "1"]  # else Triton uses only the first profile
    code, _, err = run_cli(["serve-repo", engine, "-o", repo, "--overwrite", "--max-batch-size", "8"], capsys)
    assert code == 0, err
    _, config = parse_config(repo / "layer" / "config.pbtxt")
    assert config.max_batch_size == 8
    assert [list(t.dims) for t in config.input] == [[-1, 64]] and [list(t.dims) for t in config.output] == [[-1, 64]]
    expect_one_line_error(["serve-repo", engine, "-o", tmp_path / "bad", "--max-batch-size", "9"], capsys,
                          "1..8, 1..1")
    assert not (tmp_path / "bad").exists()


def test_python_plugin_engine_is_refused(engines, tmp_path, capsys):
    repo = tmp_path / "repo"
    expect_one_line_error(["serve-repo", engines / "py" / "layer.engine", "-o", repo], capsys,
                          "Triton Inference Server cannot load", "--plugins native")
    assert not repo.exists() and files_under(tmp_path) == []


def test_engine_without_build_record_is_refused(engines, tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(engines / "eng" / "layer.engine", src / "layer.engine")
    shutil.copy(engines / "eng" / LIB, src / LIB)
    repo = tmp_path / "repo"
    expect_one_line_error(["serve-repo", src / "layer.engine", "-o", repo], capsys,
                          "not built by `omnimoe build`", "layer.engine.json")
    # A record whose library is gone is refused too.
    (src / "layer.engine.json").write_text((engines / "eng" / "layer.engine.json").read_text())
    (src / LIB).unlink()
    expect_one_line_error(["serve-repo", src / "layer.engine", "-o", repo], capsys, LIB, "missing")
    expect_one_line_error(["serve-repo", src / "nope.engine", "-o", repo], capsys, "no such engine")
    assert not repo.exists() and files_under(tmp_path) == ["src", "src/layer.engine", "src/layer.engine.json"]


def test_existing_repository_needs_overwrite_and_keeps_other_files(engines, tmp_path, capsys):
    engine = engines / "eng" / "layer.engine"
    repo = tmp_path / "repo"
    (repo / "other" / "1").mkdir(parents=True)
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    (repo / "layer").mkdir()
    (repo / "layer" / "config.pbtxt").write_text("mine\n")
    before = files_under(repo)
    expect_one_line_error(["serve-repo", engine, "-o", repo], capsys, "not empty", "--overwrite")
    assert files_under(repo) == before and (repo / "layer" / "config.pbtxt").read_text() == "mine\n"
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]  # no temporary directory left behind
    code, _, err = run_cli(["serve-repo", engine, "-o", repo, "--overwrite"], capsys)
    assert code == 0, err
    assert (repo / "other" / "config.pbtxt").read_text() == 'name: "other"\n'
    assert parse_config(repo / "layer" / "config.pbtxt")[1].platform == "tensorrt_plan"
    assert (repo / "layer" / "1" / "model.plan").read_bytes() == engine.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == ["repo"]


def test_bad_model_name(engines, tmp_path, capsys):
    expect_one_line_error(["serve-repo", engines / "eng" / "layer.engine", "-o", tmp_path / "r", "--name", "../x"],
                          capsys, "model name")
    assert not (tmp_path / "r").exists()
