"""ONNX Runtime execution providers (`--providers`) and parity on read-only model directories
(issue 13 items 4 and 5). CPU only: the CUDA / TensorRT providers are refused here, clearly."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnxruntime
import pytest

from test_parity import make_layer_ckpt, run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A checkpoint and its two exported graphs in a directory made read-only."""
    from deploy.cli import main as cli

    root = tmp_path_factory.mktemp("providers")
    make_layer_ckpt(root / "ckpt")
    make_layer_ckpt(root / "wrong", gate="softmax")
    model_dir = root / "models"
    for ops in ("plugin", "standard"):
        assert cli(["export", str(root / "ckpt"), "-o", str(model_dir / f"{ops}.onnx"), "--ops", ops]) == 0
    assert cli(["export", str(root / "wrong"), "-o", str(model_dir / "wrong.onnx")]) == 0
    model_dir.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    yield root / "ckpt", model_dir
    model_dir.chmod(0o755)


def _snapshot(directory):
    """What a write leaves behind even when the file is removed again (root ignores chmod)."""
    return sorted(os.listdir(directory)), directory.stat().st_mtime_ns


def test_parity_never_writes_the_model_directory(models, tmp_path, capsys):
    ckpt, model_dir = models
    before = _snapshot(model_dir)
    code, out, err = run_cli(["parity", ckpt, "--onnx", model_dir / "plugin.onnx", "--report", tmp_path / "r.json",
                              "--save-results", tmp_path / "res.json", "--save-inputs", tmp_path / "x.npy"], capsys)
    assert code == 0, out + err
    # The custom-op graph's routing still comes out (the extra outputs are added in memory).
    runner = json.loads((tmp_path / "r.json").read_text())["runners"]["onnxrt-plugin"]
    assert runner["routing"]["mode"] == "indices" and runner["routing"]["agreement"] == 1.0
    code, out, err = run_cli(["parity", model_dir / "plugin.onnx", "--input", tmp_path / "x.npy",
                              "--load-results", tmp_path / "res.json"], capsys)
    assert code == 0, out + err
    # ... and a wrong model (softmax instead of product gates) in the same read-only directory still fails.
    code, out, err = run_cli(["parity", ckpt, "--onnx", model_dir / "wrong.onnx", "--report", tmp_path / "r.json"], capsys)
    assert code == 1, out + err
    assert json.loads((tmp_path / "r.json").read_text())["runners"]["onnxrt-plugin"]["routing"]["mode"] == "indices"
    assert _snapshot(model_dir) == before


@pytest.fixture
def recorded_sessions(monkeypatch):
    """Record the providers every ONNX Runtime session is created with."""
    seen = []
    real = onnxruntime.InferenceSession

    def session(*args, providers=None, **kwargs):
        seen.append(list(providers))
        return real(*args, providers=providers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    return seen


def test_providers_reach_onnx_runtime(models, tmp_path, capsys, recorded_sessions):
    ckpt, model_dir = models
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32))
    code, _, err = run_cli(["run", model_dir / "plugin.onnx", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy",
                            "--providers", "cpu"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["parity", ckpt, "--onnx", model_dir / "standard.onnx", "--providers", "CPUExecutionProvider"], capsys)
    assert code == 0, out + err
    code, _, err = run_cli(["bench", ckpt, "--onnx", model_dir / "standard.onnx", "--iters", 1, "--warmup", 0,
                            "--providers", "cpu", "--json", tmp_path / "b.json"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "b.json").read_text())["providers"] == ["CPUExecutionProvider"]
    assert recorded_sessions and all(p == ["CPUExecutionProvider"] for p in recorded_sessions)


@pytest.mark.parametrize("command", ["run", "parity", "bench"])
def test_missing_or_unknown_provider_is_one_line_exit_2(command, models, tmp_path, capsys, monkeypatch):
    ckpt, model_dir = models
    # As a CPU-only onnxruntime reports them (also where onnxruntime-gpu happens to be installed).
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    np.save(tmp_path / "x.npy", np.zeros((1, 2, 16), np.float32))
    extra = {"run": ["--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"], "parity": [], "bench": ["--iters", 1]}[command]
    target = model_dir / "standard.onnx"
    for providers, words in [("cuda,cpu", ["CUDAExecutionProvider", "onnxruntime-gpu"]),
                             ("tensorrt", ["TensorrtExecutionProvider"]), ("gpu", ["unknown provider 'gpu'"])]:
        code, out, err = run_cli([command, target, *extra, "--providers", providers], capsys)
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert all(w in err for w in words), err
    assert not (tmp_path / "y.npy").exists()
