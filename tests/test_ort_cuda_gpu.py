"""The standard-op twin on ONNX Runtime's CUDA execution provider (issue 13 item 5), on a GPU with
onnxruntime-gpu installed: routing-aware parity against PyTorch for the layer and TinyOmniLM, and
the same parity failing for a wrong model."""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
ort = pytest.importorskip("onnxruntime")
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("this onnxruntime has no CUDA execution provider (install onnxruntime-gpu)", allow_module_level=True)
pytest.importorskip("polygraphy")

from test_parity import make_layer_ckpt, run_cli  # noqa: E402

from export.ort import ort_session  # noqa: E402
from omnimoe.models import TinyOmniLM  # noqa: E402
from omnimoe.train import tiny_config  # noqa: E402


def _export_standard(ckpt, path, capsys):
    code, out, err = run_cli(["export", ckpt, "-o", path, "--ops", "standard"], capsys)
    assert code == 0, out + err


def test_standard_twin_runs_on_the_cuda_provider(tmp_path, capsys):
    make_layer_ckpt(tmp_path / "layer", num_experts=64, top_k=6)
    _export_standard(tmp_path / "layer", tmp_path / "layer.onnx", capsys)
    session = ort_session(tmp_path / "layer.onnx", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert session.get_providers()[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("model", ["layer", "tiny_lm"])
def test_parity_on_the_cuda_provider(tmp_path, capsys, model):
    if model == "layer":
        make_layer_ckpt(tmp_path / "ckpt", num_experts=64, top_k=6)
        tokens = ["--tokens", 300, "--batch", 2]
    else:
        torch.manual_seed(0)
        TinyOmniLM(tiny_config("abcdefghij ")).eval().save_pretrained(tmp_path / "ckpt")
        tokens = ["--tokens", 12, "--batch", 3]
    _export_standard(tmp_path / "ckpt", tmp_path / "std.onnx", capsys)
    argv = ["parity", tmp_path / "ckpt", "--onnx", tmp_path / "std.onnx", "--runners", "torch,onnxrt",
            "--providers", "cuda", *tokens, "--report", tmp_path / "r.json"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pass"] is True

    # A wrong model (other weights, same shapes) must fail the same comparison.
    if model == "layer":
        make_layer_ckpt(tmp_path / "wrong", seed=1, num_experts=64, top_k=6)
    else:
        torch.manual_seed(1)
        TinyOmniLM(tiny_config("abcdefghij ")).eval().save_pretrained(tmp_path / "wrong")
    _export_standard(tmp_path / "wrong", tmp_path / "wrong.onnx", capsys)
    argv[3] = tmp_path / "wrong.onnx"
    argv[-1] = tmp_path / "r2.json"
    code, out, err = run_cli(argv, capsys)
    assert code == 1, out + err
