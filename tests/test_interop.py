"""polygraphy interop (issue 13 item 1): its JSON input format, per-output tolerances as it spells
them, the routing-aware comparison inside the real `polygraphy run`, and several iterations."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("polygraphy")  # the onnx extra; absent on the GPU machine
from polygraphy.comparator import RunResults  # noqa: E402
from polygraphy.json import load_json, save_json  # noqa: E402

from omnimoe import OmniMoELayer
from test_parity import make_layer_ckpt, run_cli

REPO = Path(__file__).resolve().parents[1]
POLYGRAPHY = [str(Path(sys.executable).parent / "polygraphy")]
COMPARE = str(REPO / "deploy" / "polygraphy_compare.py")


def export(cli_args, capsys):
    code, _, err = run_cli(["export", *cli_args], capsys)
    assert code == 0, err


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A checkpoint, its standard-op twin, and the same twin of two wrong models: one with a
    perturbed expert row (wrong output) and one whose shared MLP is off by 0.1 % (small error)."""
    from deploy.cli import main as cli

    root = tmp_path_factory.mktemp("interop")
    make_layer_ckpt(root / "ckpt")
    assert cli(["export", str(root / "ckpt"), "-o", str(root / "std.onnx"), "--ops", "standard"]) == 0
    with torch.no_grad():
        bad = OmniMoELayer.from_pretrained(root / "ckpt")
        bad.up_embed.weight.add_(0.5)
        bad.save_pretrained(root / "bad")
        slight = OmniMoELayer.from_pretrained(root / "ckpt")
        slight.down_proj.weight.mul_(1.001)
        slight.save_pretrained(root / "slight")
    for name in ("bad", "slight"):
        assert cli(["export", str(root / name), "-o", str(root / f"{name}.onnx"), "--ops", "standard"]) == 0
    # Reference: torch + both graphs, 3 iterations, inputs in polygraphy's format.
    assert cli(["parity", str(root / "ckpt"), "--iterations", "3", "--tokens", "9", "--save-inputs", str(root / "x.json"),
                "--save-results", str(root / "ref.json"), "--runners", "torch"]) == 0
    return root


def polygraphy(*args):
    # As a user runs it: polygraphy's own CLI, with omnimoe installed (deploy/ importable).
    proc = subprocess.run([*POLYGRAPHY, *map(str, args)], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def test_save_inputs_writes_polygraphy_json(setup):
    feeds = load_json(str(setup / "x.json"))
    assert isinstance(feeds, list) and len(feeds) == 3
    assert all(list(f) == ["x"] and f["x"].shape == (2, 9, 16) and f["x"].dtype == np.float32 for f in feeds)
    assert not np.array_equal(feeds[0]["x"], feeds[1]["x"])  # each iteration its own input
    results = RunResults.load(str(setup / "ref.json"))
    (name, iters), = results.items()
    assert name == "torch" and len(iters) == 3 and "routing.0.log_probs_x" in iters[0]


def test_polygraphy_run_uses_the_routing_aware_compare_func(setup):
    """The real `polygraphy run`: ONNX Runtime on the standard-op twin against omnimoe's saved
    torch reference (with its routing), through --compare-func-script."""
    path_from_module = subprocess.run([sys.executable, "-m", "deploy.polygraphy_compare"], capture_output=True, text=True,
                                      cwd=REPO, check=True).stdout.strip()
    assert Path(path_from_module).resolve() == Path(COMPARE).resolve()
    base = ["--onnxrt", "--load-inputs", setup / "x.json", "--load-outputs", setup / "ref.json",
            "--compare-func-script", COMPARE]
    code, out = polygraphy("run", setup / "std.onnx", *base)
    assert code == 0, out
    assert out.count("omnimoe routing-aware | y: 18 tokens, routing inferred-from-output") == 3, out
    code, out = polygraphy("run", setup / "bad.onnx", *base)
    assert code != 0 and "output mismatch" in out and "FAILED" in out, out


def test_polygraphy_run_excuses_a_near_tie_only_with_the_routing(setup, tmp_path):
    """A reference whose token 0 has a near-tie at the top-K boundary, and a run whose output
    differs exactly there: polygraphy's default comparison fails it; ours passes it as a near-tie,
    and fails it again once the near-tie is gone."""
    results = RunResults.load(str(setup / "ref.json"))
    (_, iters), = results.items()

    def save(tie: bool, path):
        edited = []
        for it in iters:
            it = type(it)({k: np.array(v) for k, v in it.items()}, runner_name="torch")
            if tie:  # all y-axis experts of token 0 score the same: its K-th and (K+1)-th tie
                it["routing.0.log_probs_y"][0] = np.log(1 / 6)
            edited.append(it)
        RunResults([("torch", edited)]).save(str(path))

    # The run: the twin's outputs with token 0 of each iteration moved.
    code, out = polygraphy("run", setup / "std.onnx", "--onnxrt", "--load-inputs", setup / "x.json",
                           "--save-outputs", tmp_path / "twin.json")
    assert code == 0, out
    twin = RunResults.load(str(tmp_path / "twin.json"))
    (tname, titers), = twin.items()
    for it in titers:
        it["y"] = np.array(it["y"])
        it["y"][0, 0] += 0.1
    RunResults([(tname, titers)]).save(str(tmp_path / "moved.json"))
    save(True, tmp_path / "ref_tie.json")
    save(False, tmp_path / "ref_plain.json")
    load = ["run", "--load-outputs", tmp_path / "moved.json"]
    code, out = polygraphy(*load, tmp_path / "ref_tie.json")
    assert code != 0, out  # polygraphy's own element-wise comparison
    code, out = polygraphy(*load, tmp_path / "ref_tie.json", "--compare-func-script", COMPARE)
    assert code == 0 and "near-tie 1" in out, out
    code, out = polygraphy(*load, tmp_path / "ref_plain.json", "--compare-func-script", COMPARE)
    assert code != 0 and "output mismatch 1" in out, out


def test_omnimoe_reads_polygraphy_outputs_and_inputs(setup, tmp_path, capsys):
    code, out = polygraphy("run", setup / "std.onnx", "--onnxrt", "--load-inputs", setup / "x.json",
                           "--save-outputs", tmp_path / "ort.json")
    assert code == 0, out
    code, out, err = run_cli(["parity", setup / "ckpt", "--runners", "torch", "--input", setup / "x.json",
                              "--load-results", tmp_path / "ort.json", "--report", tmp_path / "r.json"], capsys)
    assert code == 0, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["reference"].startswith("onnxrt")  # polygraphy's runner name
    assert report["iterations"] == 3 and report["runners"]["torch"]["tokens"] == 3 * 18
    # The same inputs against the wrong model fail.
    code, out, err = run_cli(["parity", setup / "bad.onnx", "--input", setup / "x.json", "--load-results", setup / "ref.json"],
                             capsys)
    assert code == 1, out + err


def test_per_output_tolerances_as_polygraphy_spells_them(setup, tmp_path, capsys):
    args = ["parity", setup / "ckpt", "--onnx", setup / "slight.onnx", "--report", tmp_path / "r.json"]
    code, out, err = run_cli(args, capsys)
    assert code == 1, out + err  # 0.1 % off: over the fp32 defaults
    for tol in (["--atol", "y:1e-2", "--rtol", "y:1e-2"], ["--atol", "1e-6", "y:1e-2", "--rtol", "y:1e-2"],
                ["--atol", "1e-2", "--rtol", "1e-2"]):
        code, out, err = run_cli([*args, *tol], capsys)
        assert code == 0, (tol, out + err)
        report = json.loads((tmp_path / "r.json").read_text())
        assert report["tolerances"]["atol"] == 1e-2 and report["tolerances"]["rtol"] == 1e-2
    code, out, err = run_cli([*args, "--atol", "1e-2", "y:1e-6", "--rtol", "1e-2"], capsys)
    assert code == 1, out + err  # the per-output value wins over the default
    for bad, words in [(["--atol", "logits:1e-4"], "no output 'logits'"), (["--atol", "y:x"], "--atol"),
                       (["--rtol", "-1"], "finite number >= 0")]:
        code, out, err = run_cli([*args, *bad], capsys)
        assert code == 2 and err.count("\n") == 1 and words in err, (bad, err)


def test_iterations_and_json_inputs_for_run_and_parity(setup, tmp_path, capsys):
    code, out, err = run_cli(["run", setup / "std.onnx", "--input", setup / "x.json", "-o", tmp_path / "y.json"], capsys)
    assert code == 0, err
    ys, feeds = load_json(str(tmp_path / "y.json")), load_json(str(setup / "x.json"))
    expected = [OmniMoELayer.from_pretrained(setup / "ckpt")(torch.from_numpy(f["x"])).detach().numpy() for f in feeds]
    assert len(ys) == 3 and all(np.allclose(y["y"], e, atol=1e-5) for y, e in zip(ys, expected))
    code, _, err = run_cli(["run", setup / "std.onnx", "--input", setup / "x.json", "-o", tmp_path / "y.npy"], capsys)
    assert code == 2 and "3 iterations" in err and not (tmp_path / "y.npy").exists()
    save_json([{"x": feeds[0]["x"]}], str(tmp_path / "one.json"))
    code, _, err = run_cli(["run", setup / "std.onnx", "--input", tmp_path / "one.json", "-o", tmp_path / "y.npy"], capsys)
    assert code == 0 and np.allclose(np.load(tmp_path / "y.npy"), expected[0], atol=1e-5)

    # parity --iterations N: every iteration is compared; a wrong model fails.
    code, out, err = run_cli(["parity", setup / "ckpt", "--onnx", setup / "bad.onnx", "--iterations", 2, "--tokens", 5,
                              "--report", tmp_path / "r.json"], capsys)
    assert code == 1, out + err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["iterations"] == 2 and report["runners"]["onnxrt"]["tokens"] == 2 * 2 * 5
    for bad, words in [(["--iterations", 0], "--iterations"), (["--iterations", 2, "--save-inputs", tmp_path / "x.npy"], ".json"),
                       (["--iterations", 2, "--input", setup / "x.json"], "3 iterations"),
                       (["--input", setup / "x.json", "--load-results", tmp_path / "missing.json"], "no such results file")]:
        code, out, err = run_cli(["parity", setup / "ckpt", *bad], capsys)
        assert code == 2 and err.count("\n") == 1 and words in err, (bad, err)
    save_json([{"x": feeds[0]["x"]}], str(tmp_path / "one.json"))
    code, out, err = run_cli(["parity", setup / "std.onnx", "--input", tmp_path / "one.json", "--load-results", setup / "ref.json"],
                             capsys)
    assert code == 2 and "iterations" in err, err
    (tmp_path / "junk.json").write_text("[1, 2")
    code, out, err = run_cli(["parity", setup / "ckpt", "--input", tmp_path / "junk.json"], capsys)
    assert code == 2 and err.count("\n") == 1 and "polygraphy input data" in err, err
