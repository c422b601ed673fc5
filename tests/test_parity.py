"""omnimoe run and routing-aware omnimoe parity (issue 6): passes on right models, fails on wrong ones."""
import json

import numpy as np
import pytest
import torch

from deploy.cli import main as cli
from deploy.parity import Tolerances, compare_runs
from omnimoe import OmniMoEConfig, OmniMoELayer
from omnimoe.models import TinyOmniLM
from omnimoe.train import tiny_config


def run_cli(args, capsys):
    code = cli([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def make_layer_ckpt(path, seed=0, gate="product", **overrides):
    torch.manual_seed(seed)
    cfg = dict(hidden_size=16, num_experts=36, top_k=4, intermediate_size=24, gate=gate)
    cfg.update(overrides)
    layer = OmniMoELayer(OmniMoEConfig(**cfg)).eval()
    layer.router_norm_x.running_var.uniform_(0.5, 2.0)
    layer.save_pretrained(path)
    return layer


@pytest.fixture(scope="module")
def layer_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("parity") / "layer"
    make_layer_ckpt(path)
    return path


def test_parity_passes_on_layer_checkpoint(layer_ckpt, tmp_path, capsys):
    code, out, err = run_cli(["parity", layer_ckpt, "--report", tmp_path / "r.json", "--save-results", tmp_path / "res.json",
                              "--save-inputs", tmp_path / "x.npy"], capsys)
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pass"] and report["reference"] == "torch"
    plugin = report["runners"]["onnxrt-plugin"]
    assert plugin["routing"]["mode"] == "indices" and plugin["routing"]["agreement"] == 1.0
    assert report["runners"]["onnxrt"]["outputs"]["y"]["max_abs"] < 1e-5
    assert plugin["tokens"] == 2 * 37 and len(plugin["worst_tokens"]) == 5

    # Saved results (with the reference routing) check an ONNX model later, e.g. on another machine.
    code, out, err = run_cli(["export", layer_ckpt, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["parity", tmp_path / "m.onnx", "--input", tmp_path / "x.npy", "--load-results", tmp_path / "res.json",
                              "--report", tmp_path / "r2.json"], capsys)
    assert code == 0, out + err
    report = json.loads((tmp_path / "r2.json").read_text())
    assert report["reference"] == "torch" and report["runners"]["onnxrt-plugin"]["routing"]["agreement"] == 1.0


def _wrong_models():
    def perturb_expert_row(layer):
        x = torch.randn(64, 16)
        _, idx = layer.route(x)
        layer.up_embed.weight[int(idx[0, 0])] += 1.0

    def swap_router_rows(layer):
        w = layer.router_gate_x.weight
        w[[0, 1]] = w[[1, 0]]

    return {"perturbed expert row": perturb_expert_row, "swapped router row": swap_router_rows}


@pytest.mark.parametrize("case", ["perturbed expert row", "swapped router row", "wrong gate mode"])
@pytest.mark.parametrize("ops", ["plugin", "standard"])
def test_parity_fails_on_wrong_model(case, ops, layer_ckpt, tmp_path, capsys):
    good = OmniMoELayer.from_pretrained(layer_ckpt)
    if case == "wrong gate mode":
        bad = make_layer_ckpt(tmp_path / "bad", gate="softmax")
    else:
        with torch.no_grad():
            _wrong_models()[case](good)
        good.save_pretrained(tmp_path / "bad")
    code, _, err = run_cli(["export", tmp_path / "bad", "-o", tmp_path / "bad.onnx", "--ops", ops], capsys)
    assert code == 0, err
    code, out, err = run_cli(["parity", layer_ckpt, "--onnx", tmp_path / "bad.onnx", "--report", tmp_path / "r.json"], capsys)
    assert code == 1, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    (runner,) = report["runners"].values()
    counts = runner["status_counts"]
    assert not report["pass"] and counts["routing_mismatch"] + counts["output_mismatch"] > 0
    if case == "swapped router row" and ops == "plugin":
        assert counts["routing_mismatch"] > 0 and runner["routing"]["agreement"] < 1


def _ref_outputs(T=6, s=4, K=3, seed=0):
    """Reference outputs in the runner format, with one planted near-tie at token 2."""
    from omnimoe.ops import product_key_topk_scores

    g = torch.Generator().manual_seed(seed)
    px = torch.log_softmax(torch.randn(T, s, generator=g), -1)
    py = torch.log_softmax(torch.randn(T, s, generator=g), -1)
    scores, idx = product_key_topk_scores(px, py, K + 1)
    # Plant: token 2's (K+1)-th expert scores 1e-6 below its K-th.
    kth, nxt = int(idx[2, K - 1]), int(idx[2, K])
    py[2, nxt % s] = px[2, kth // s] + py[2, kth % s] - px[2, nxt // s] - 1e-6
    _, idx = product_key_topk_scores(px, py, K + 1)
    y = torch.randn(T, 8, generator=g).numpy()
    ref = {"y": y, "routing.0.log_probs_x": px.numpy(), "routing.0.log_probs_y": py.numpy(),
           "routing.0.indices": idx[:, :K].to(torch.int32).numpy()}
    return ref, idx.numpy()


def test_planted_near_tie_passes_and_is_reported():
    ref, idx4 = _ref_outputs()
    tol = Tolerances(1e-5, 1e-5, 1e-4)
    run = {k: v.copy() for k, v in ref.items()}
    run["routing.0.indices"][2, 2] = idx4[2, 3]  # the runner took the near-tied (K+1)-th expert
    run["y"][2] += 0.1  # ... which changes that token's output
    result = compare_runs(ref, run, "y", tol, seq_len=6, causal=False)
    assert result["pass"] and result["status_counts"]["near_tie"] == 1
    assert result["routing"]["agreement"] == pytest.approx(5 / 6)

    # The same swap on a token without a near-tie is a real routing difference.
    run = {k: v.copy() for k, v in ref.items()}
    run["routing.0.indices"][4, 2] = idx4[4, 3] if idx4[4, 3] != ref["routing.0.indices"][4, 2] else idx4[4, 0]
    result = compare_runs(ref, run, "y", tol, seq_len=6, causal=False)
    assert not result["pass"] and result["status_counts"]["routing_mismatch"] == 1


def test_near_tie_without_runner_routing_is_inferred_and_propagates_causally():
    ref, _ = _ref_outputs()
    tol = Tolerances(1e-5, 1e-5, 1e-4)
    run = {"y": ref["y"].copy()}
    run["y"][3] += 0.1  # token 3 comes after the near-tie at token 2 in the same sequence
    assert compare_runs(ref, run, "y", tol, seq_len=6, causal=True)["pass"]
    result = compare_runs(ref, run, "y", tol, seq_len=6, causal=False)
    assert not result["pass"] and result["status_counts"]["output_mismatch"] == 1
    assert result["routing"]["mode"] == "inferred-from-output" and result["routing"]["near_tie_boundary_tokens"] == 1


def test_parity_on_tiny_lm(tmp_path, capsys):
    torch.manual_seed(0)
    model = TinyOmniLM(tiny_config("abcdefghij ")).eval()
    model.save_pretrained(tmp_path / "lm")
    code, out, err = run_cli(["parity", tmp_path / "lm", "--tokens", 12, "--report", tmp_path / "r.json"], capsys)
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["runners"]["onnxrt-plugin"]["routing"]["layers"] == 2


def test_run_bad_inputs(layer_ckpt, tmp_path, capsys):
    np.save(tmp_path / "x.npy", np.random.randn(1, 5, 16).astype(np.float32))
    code, out, _ = run_cli(["run", layer_ckpt, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"], capsys)
    assert code == 0 and np.load(tmp_path / "y.npy").shape == (1, 5, 16)
    cases = {
        "wrong shape": np.zeros((1, 5, 15), np.float32),
        "wrong rank": np.zeros((5,), np.float32),
        "wrong dtype": np.zeros((1, 5, 16), np.int64),
    }
    for name, arr in cases.items():
        np.save(tmp_path / "bad.npy", arr)
        code, _, err = run_cli(["run", layer_ckpt, "--input", tmp_path / "bad.npy", "-o", tmp_path / "z.npy"], capsys)
        assert code == 2 and err.count("\n") == 1, name
        assert not (tmp_path / "z.npy").exists()
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    for target, inp in [(layer_ckpt, tmp_path / "junk.npy"), (tmp_path / "missing.onnx", tmp_path / "x.npy"),
                        (tmp_path / "missing.engine", tmp_path / "x.npy")]:
        code, _, err = run_cli(["run", target, "--input", inp, "-o", tmp_path / "z.npy"], capsys)
        assert code == 2 and err.count("\n") == 1 and not (tmp_path / "z.npy").exists()


def test_run_nan_input_reported_and_empty_input(layer_ckpt, tmp_path, capsys):
    x = np.random.randn(1, 4, 16).astype(np.float32)
    x[0, 1, 3] = np.nan
    np.save(tmp_path / "x.npy", x)
    code, _, err = run_cli(["run", layer_ckpt, "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"], capsys)
    assert code == 0 and "NaN/Inf" in err
    assert np.isnan(np.load(tmp_path / "y.npy")[0, 1]).any()
    np.save(tmp_path / "x0.npy", np.zeros((1, 0, 16), np.float32))
    code, _, err = run_cli(["run", layer_ckpt, "--input", tmp_path / "x0.npy", "-o", tmp_path / "y0.npy"], capsys)
    assert code == 0 and np.load(tmp_path / "y0.npy").shape == (1, 0, 16)


def test_run_corrupt_checkpoint(layer_ckpt, tmp_path, capsys):
    import shutil

    shutil.copytree(layer_ckpt, tmp_path / "ck")
    w = tmp_path / "ck" / "model.safetensors"
    np.save(tmp_path / "x.npy", np.zeros((1, 2, 16), np.float32))
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"\x00" * 8 + b[8:]):
        w.write_bytes(damage((layer_ckpt / "model.safetensors").read_bytes()))
        code, _, err = run_cli(["run", tmp_path / "ck", "--input", tmp_path / "x.npy", "-o", tmp_path / "y.npy"], capsys)
        assert code == 2 and err.count("\n") == 1 and "safetensors" in err
    code, _, err = run_cli(["parity", tmp_path / "ck"], capsys)
    assert code == 2


def test_bench_times_every_cpu_runner(layer_ckpt, tmp_path, capsys):
    code, out, err = run_cli(["bench", layer_ckpt, "--tokens", 8, "--iters", 3, "--warmup", 1, "--json", tmp_path / "b.json"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "b.json").read_text())
    assert [r["runner"] for r in doc["results"]] == ["torch", "onnxrt", "onnxrt-plugin"]
    assert all(r["median_ms"] > 0 and r["tokens_per_s"] > 0 for r in doc["results"])
    code, _, err = run_cli(["bench", layer_ckpt, "--runners", "trt"], capsys)
    assert code == 2 and err.count("\n") == 1


def test_parity_with_zero_tokens_compares_nothing(layer_ckpt, tmp_path, capsys):
    # Issue 12: zero tokens is not a pass; nothing is compared and no report is written.
    code, out, err = run_cli(["parity", layer_ckpt, "--tokens", 0, "--report", tmp_path / "r.json"], capsys)
    assert code == 2 and "nothing to compare" in err and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
