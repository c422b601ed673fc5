"""Issue 12: hostile-but-plausible input, the output policy, signals and concurrent writers.

Every bad input ends in exit 2 with exactly one line on stderr and leaves the working directory
exactly as it was (nothing deleted, replaced or left behind); an existing output directory is
only written into with --overwrite, and then only the command's own files are replaced;
SIGINT/SIGTERM/SIGHUP remove temporary files and exit 128 + signal; concurrent writers of one
output end with one complete result. Signals and concurrency run real subprocesses; everything
else calls the CLI in-process on tiny models.
"""
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
import zipfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from deploy.cli import main as cli
from naive import naive_layer
from omnimoe import OmniMoEConfig, OmniMoELayer
from omnimoe.atomic import atomic_path
from omnimoe.models import TinyOmniLM, TinyOmniLMConfig

LAYER = dict(hidden_size=8, num_experts=16, top_k=2, intermediate_size=8)


def run_cli(args, capsys):
    code = cli([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(root: Path) -> dict:
    """Every entry under root (hidden ones too): relative path -> content hash, or 'dir'."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_refused(code, err, expect=None):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    if expect:
        assert expect in err, err


def temp_leftovers(root: Path) -> list:
    return [p for p in root.rglob(".*.tmp")]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """ck/ (layer), up.safetensors (the same weights, upstream layout), lm/ (TinyOmniLM, max_seq_len 6),
    their plugin ONNX graphs, and inputs."""
    root = tmp_path_factory.mktemp("assets")
    torch.manual_seed(0)
    layer = OmniMoELayer(OmniMoEConfig(**LAYER)).eval()
    layer.router_norm_x.running_var.uniform_(0.5, 2.0)
    layer.save_pretrained(root / "ck")
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(root / "up.safetensors"))
    lm = TinyOmniLM(TinyOmniLMConfig(vocab_size=11, hidden_size=8, num_layers=1, num_heads=2, max_seq_len=6,
                                     moe=OmniMoEConfig(**LAYER))).eval()
    lm.save_pretrained(root / "lm")
    np.save(root / "x.npy", np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32))
    np.save(root / "ids_long.npy", np.ones((1, 9), np.int64))
    assert cli(["export", str(root / "ck"), "-o", str(root / "ck.onnx")]) == 0
    assert cli(["export", str(root / "lm"), "-o", str(root / "lm.onnx")]) == 0
    return root


@pytest.fixture
def work(assets, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(assets, w)
    return w


# ---------------------------------------------------------------------------------------------
# A table of bad inputs per subcommand: exit 2, one line naming the problem, nothing changed
# ---------------------------------------------------------------------------------------------
def _config(w, src="ck", **changes):
    d = w / "cfg"
    shutil.copytree(w / src, d)
    data = json.loads((d / "config.json").read_text())
    data.update(changes)
    (d / "config.json").write_text(json.dumps(data))
    return d


def _config_text(w, text):
    d = w / "cfg"
    shutil.copytree(w / "ck", d)
    (d / "config.json").write_text(text)
    return d


def _config_dir(w):
    d = w / "cfg"
    shutil.copytree(w / "ck", d)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    return d


def _upstream(w, name, change):
    sd = load_file(str(w / "up.safetensors"))
    change(sd)
    save_file(sd, str(w / name))
    return w / name


def _native_weights(w, change):
    d = w / "bad_ck"
    shutil.copytree(w / "ck", d)
    sd = load_file(str(d / "model.safetensors"))
    change(sd)
    save_file(sd, str(d / "model.safetensors"))
    return d


def _to_int(key):
    return lambda sd: sd.__setitem__(key, sd[key].to(torch.int32))


def _negative_var(sd):
    sd["router_norm_x.running_var"] = -sd["router_norm_x.running_var"] - 1


def _pickle(w, obj):
    torch.save(obj, w / "w.pt")
    return w / "w.pt"


def _dir_with_file(w, name):
    (w / name).mkdir()
    (w / name / "keep.txt").write_text("the user's\n")
    return w / name


def _npz_raw(w, members: dict):
    with zipfile.ZipFile(w / "in.npz", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return w / "in.npz"


def _npy_bytes(a):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=True)
    return buf.getvalue()


def _identity_onnx(w, d):
    """A graph with the layer's I/O names, x [batch, seq, d] -> y: what another model's export looks like."""
    import onnx
    from onnx import TensorProto, helper

    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", "seq", d])  # noqa: E731
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [value("x")], [value("y")])
    onnx.save(helper.make_model(graph), str(w / "other.onnx"))
    return w / "other.onnx"


def _x(w):
    return np.load(w / "x.npy")


CASES = {
    # convert
    "convert: output directory holds other files": lambda w: (
        ["convert", w / "up.safetensors", "-o", _dir_with_file(w, "out"), "--top-k", 2], "not empty"),
    "convert: output directory is the source's folder": lambda w: (
        ["convert", w / "ck" / "model.safetensors", "-o", w / "ck", "--top-k", 2], "not empty"),
    "convert: output is an existing file": lambda w: (
        ["convert", w / "up.safetensors", "-o", w / "x.npy", "--top-k", 2], "not a directory"),
    "convert: output's parent is a file": lambda w: (
        ["convert", w / "up.safetensors", "-o", w / "x.npy" / "ck", "--top-k", 2], "not a directory"),
    "convert: integer weights": lambda w: (
        ["convert", _upstream(w, "i.safetensors", _to_int("up_embed.weight")), "-o", w / "out", "--top-k", 2], "up_embed.weight"),
    "convert: bool weights": lambda w: (
        ["convert", _upstream(w, "b.safetensors", lambda sd: sd.__setitem__("down_embed.weight", sd["down_embed.weight"] > 0)),
         "-o", w / "out", "--top-k", 2], "down_embed.weight"),
    "convert: negative BatchNorm variance": lambda w: (
        ["convert", _upstream(w, "v.safetensors", _negative_var), "-o", w / "out", "--top-k", 2], "running_var"),
    "convert: pickle with non-string keys": lambda w: (
        ["convert", _pickle(w, {1: torch.zeros(2)}), "-o", w / "out", "--top-k", 2, "--allow-pickle"], "keys must be strings"),
    "convert: pickle refused by weights_only (torch's advice stays off stderr)": lambda w: (
        ["convert", _pickle(w, {"up_embed.weight": torch.zeros(4, 2), "f": Fraction(1, 3)}), "-o", w / "out", "--top-k", 2,
         "--allow-pickle"], "weights_only"),
    # export
    "export: config.json is a directory": lambda w: (["export", _config_dir(w), "-o", w / "m.onnx"], "is a directory"),
    "export: config.json nested 100000 deep": lambda w: (
        ["export", _config_text(w, "[" * 100000 + "]" * 100000), "-o", w / "m.onnx"], "nested"),
    "export: num_experts is a string": lambda w: (["export", _config(w, num_experts="16"), "-o", w / "m.onnx"], "num_experts"),
    "export: top_k is a boolean": lambda w: (["export", _config(w, top_k=True), "-o", w / "m.onnx"], "top_k"),
    "export: norm_eps is infinite": lambda w: (["export", _config(w, norm_eps=math.inf), "-o", w / "m.onnx"], "norm_eps"),
    "export: hidden_size beyond any memory": lambda w: (
        ["export", _config(w, hidden_size=2**62), "-o", w / "m.onnx"], "hidden_size"),
    "export: sizes that need more memory than a machine maps": lambda w: (
        ["export", _config(w, hidden_size=2**30, num_experts=2**30), "-o", w / "m.onnx"], "TiB"),
    "export: LM vocab_size is a boolean": lambda w: (
        ["export", _config(w, "lm", vocab_size=True), "-o", w / "m.onnx"], "vocab_size"),
    "export: LM alphabet is a number": lambda w: (["export", _config(w, "lm", alphabet=5), "-o", w / "m.onnx"], "alphabet"),
    "export: LM num_layers far beyond its weights": lambda w: (
        ["export", _config(w, "lm", num_layers=3000), "-o", w / "m.onnx"], "num_layers"),
    "export: integer weights in a checkpoint": lambda w: (
        ["export", _native_weights(w, _to_int("up_embed.weight")), "-o", w / "m.onnx"], "up_embed.weight"),
    # run
    "run: -o is an existing directory": lambda w: (
        ["run", w / "ck", "--input", w / "x.npy", "-o", _dir_with_file(w, "y.npy")], "is a directory"),
    "run: -o is the input": lambda w: (["run", w / "ck", "--input", w / "x.npy", "-o", w / "x.npy"], "input"),
    "run: -o's parent is a file": lambda w: (["run", w / "ck", "--input", w / "x.npy", "-o", w / "x.npy" / "y.npy"], "not a directory"),
    "run: .npz that is not a zip": lambda w: (
        ["run", w / "ck", "--input", _write(w / "in.npz", b"PK\x03\x04" + b"\0" * 60), "-o", w / "y.npy"], "in.npz"),
    "run: .npz member that is not an array": lambda w: (
        ["run", w / "ck", "--input", _npz_raw(w, {"x.npy": b"garbage"}), "-o", w / "y.npy"], "'x'"),
    "run: .npz member holding a pickled object": lambda w: (
        ["run", w / "ck", "--input", _npz_raw(w, {"x.npy": _npy_bytes(np.array([{"a": 1}], dtype=object))}), "-o", w / "y.npy"], "'x'"),
    "run: .npz with a corrupt second member": lambda w: (
        ["run", w / "ck", "--input", _npz_raw(w, {"x.npy": _npy_bytes(_x(w)), "extra.npy": b"\x93NUMPY garbage"}),
         "-o", w / "y.npy"], "'extra'"),
    "run: ONNX LM longer than its max_seq_len": lambda w: (
        ["run", w / "lm.onnx", "--input", w / "ids_long.npy", "-o", w / "y.npy"], "max_seq_len"),
    "run: negative BatchNorm variance in a checkpoint": lambda w: (
        ["run", _native_weights(w, _negative_var), "--input", w / "x.npy", "-o", w / "y.npy"], "running_var"),
    # parity
    "parity: --tokens 0": lambda w: (["parity", w / "ck", "--tokens", 0], "nothing to compare"),
    "parity: an input with zero batch": lambda w: (
        ["parity", w / "ck", "--input", _save(w / "z.npy", np.zeros((0, 5, 8), np.float32))], "nothing to compare"),
    "parity: an input with zero-length sequences": lambda w: (
        ["parity", w / "ck", "--input", _save(w / "z.npy", np.zeros((2, 0, 8), np.float32))], "nothing to compare"),
    "parity: no runner besides the reference": lambda w: (["parity", w / "ck", "--runners", "torch"], "nothing to compare"),
    "parity: --onnx of a model with another hidden size": lambda w: (
        ["parity", w / "ck", "--onnx", _identity_onnx(w, 16)], "other.onnx"),
    "parity: the same --onnx twice": lambda w: (["parity", w / "ck", "--onnx", w / "ck.onnx", "--onnx", w / "ck.onnx"], "twice"),
    "parity: --runners torch,torch": lambda w: (["parity", w / "ck", "--runners", "torch,torch"], "torch"),
    "parity: --atol nan": lambda w: (["parity", w / "ck", "--atol", "nan"], "--atol"),
    "parity: --rtol -1": lambda w: (["parity", w / "ck", "--rtol", "-1"], "--rtol"),
    "parity: --tie-tol inf": lambda w: (["parity", w / "ck", "--tie-tol", "inf"], "--tie-tol"),
    "parity: --report is an existing directory": lambda w: (
        ["parity", w / "ck", "--report", _dir_with_file(w, "r.json")], "is a directory"),
    "parity: --report's parent is a file": lambda w: (["parity", w / "ck", "--report", w / "x.npy" / "r.json"], "not a directory"),
    "parity: --save-inputs is the --input": lambda w: (
        ["parity", w / "ck", "--input", w / "x.npy", "--save-inputs", w / "x.npy"], "input"),
    "parity: ONNX LM --tokens beyond max_seq_len": lambda w: (["parity", w / "lm.onnx", "--tokens", 9], "max_seq_len"),
    "parity: --tokens needing more memory than the machine has": lambda w: (
        ["parity", w / "ck", "--tokens", 10**12], "GiB"),
    "parity: --load-results that is not RunResults (polygraphy's [!] lines stay off stderr)": lambda w: (
        ["parity", w / "ck.onnx", "--input", w / "x.npy", "--load-results", _write(w / "r.json", b'{"a": 1}')], "r.json"),
    # bench
    "bench: --json is an existing directory": lambda w: (
        ["bench", w / "ck", "--runners", "torch", "--iters", 1, "--warmup", 0, "--json", _dir_with_file(w, "b.json")], "is a directory"),
    "bench: --json's parent is a file": lambda w: (
        ["bench", w / "ck", "--runners", "torch", "--iters", 1, "--warmup", 0, "--json", w / "x.npy" / "b.json"], "not a directory"),
    "bench: --tokens 0": lambda w: (["bench", w / "ck", "--runners", "torch", "--tokens", 0], "nothing to time"),
    "bench: --runners torch,torch": lambda w: (
        ["bench", w / "ck", "--runners", "torch,torch", "--iters", 1, "--warmup", 0], "torch"),
    # build
    "build: -o is the input ONNX": lambda w: (["build", w / "ck.onnx", "-o", w / "ck.onnx"], "input"),
    "build: -o's parent is a file": lambda w: (["build", w / "ck.onnx", "-o", w / "x.npy" / "e.engine"], "not a directory"),
}


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def _save(path, array):
    np.save(path, array)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, work, capsys):
    args, expect = CASES[case](work)
    before = snapshot(work)
    code, out, err = run_cli(args, capsys)
    assert_refused(code, err, expect)
    assert snapshot(work) == before, "the command changed, created or deleted files"


# ---------------------------------------------------------------------------------------------
# The output policy
# ---------------------------------------------------------------------------------------------
def test_convert_overwrite_replaces_only_its_own_files(work, capsys):
    out = _dir_with_file(work, "out")
    (out / "model.safetensors").write_bytes(b"stale")
    code, _, err = run_cli(["convert", work / "up.safetensors", "-o", out, "--top-k", 3, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "keep.txt").read_text() == "the user's\n"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt", "model.safetensors"]
    layer = OmniMoELayer.from_pretrained(out)
    assert layer.config.top_k == 3
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in load_file(str(work / "up.safetensors")).items())
    # ... but never its own input, even with --overwrite
    before = snapshot(work)
    code, _, err = run_cli(["convert", out / "model.safetensors", "-o", out, "--top-k", 2, "--overwrite"], capsys)
    assert_refused(code, err, "input")
    assert snapshot(work) == before
    # a file output replaces the file it names (and only that)
    for _ in range(2):
        code, _, err = run_cli(["run", work / "ck", "--input", work / "x.npy", "-o", out / "y.npy"], capsys)
        assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "keep.txt", "model.safetensors", "y.npy"]


def test_outputs_get_the_users_umask(work, capsys):
    old = os.umask(0o027)
    try:
        code, _, err = run_cli(["convert", work / "up.safetensors", "-o", work / "out", "--top-k", 2], capsys)
        assert code == 0, err
        OmniMoELayer.from_pretrained(work / "out").save_pretrained(work / "saved")
    finally:
        os.umask(old)
    for d in ("out", "saved"):
        assert (work / d).stat().st_mode & 0o777 == 0o750
        for name in ("config.json", "model.safetensors"):
            assert (work / d / name).stat().st_mode & 0o777 == 0o640, (d, name)


def test_special_file_outputs_are_written_through_not_replaced(work, capsys):
    """/dev/null, /dev/stdout or a FIFO as output: written into, never replaced by a regular file."""
    import io
    import stat
    import threading

    fifo = work / "y.npy"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_bytes()), daemon=True)
    reader.start()
    code, _, err = run_cli(["run", work / "ck", "--input", work / "x.npy", "-o", fifo], capsys)
    assert code == 0, err
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert got and np.load(io.BytesIO(got[0])).shape == (2, 5, 8)
    assert not temp_leftovers(work)


def test_a_failed_write_leaves_no_directories_it_created(tmp_path):
    target = tmp_path / "new" / "sub" / "model.onnx"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_fp16_checkpoints_run_and_pass_parity(work, capsys):
    sd = load_file(str(work / "up.safetensors"))
    save_file({k: (v.half() if v.is_floating_point() else v) for k, v in sd.items()}, str(work / "h.safetensors"))
    code, _, err = run_cli(["convert", work / "h.safetensors", "-o", work / "h", "--top-k", 2], capsys)
    assert code == 0, err
    code, _, err = run_cli(["run", work / "h", "--input", work / "x.npy", "-o", work / "y.npy"], capsys)
    assert code == 0, err
    y = np.load(work / "y.npy")
    assert y.dtype == np.float16 and y.shape == (2, 5, 8)
    code, out, err = run_cli(["parity", work / "h", "--report", work / "r.json"], capsys)
    assert code == 0, out + err
    report = json.loads((work / "r.json").read_text())
    assert report["pass"] and set(report["runners"]) == {"onnxrt", "onnxrt-plugin"}


# ---------------------------------------------------------------------------------------------
# Signals: real subprocesses, real signals, at several points of a large export
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A layer with 2 x 32 MiB expert tables (external data makes the export write 64 MiB)."""
    root = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    layer = OmniMoELayer(OmniMoEConfig(hidden_size=512, num_experts=16384, top_k=2)).eval()
    layer.save_pretrained(root / "ck")
    return root / "ck"


def _spawn(args, cwd, stderr_path):
    with open(stderr_path, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "deploy.cli", *map(str, args)], cwd=cwd, stdout=subprocess.DEVNULL,
                                stderr=err)


def _wait_for(proc, condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("the point to signal at never came")


@pytest.mark.parametrize(
    "sig, point",
    [(signal.SIGTERM, "trace"), (signal.SIGTERM, "write"), (signal.SIGTERM, "graph"), (signal.SIGHUP, "write"),
     (signal.SIGINT, "write")],
)
def test_signal_during_export_removes_everything_and_exits_128_plus_signal(sig, point, big, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _spawn(["export", big, "-o", out / "big.onnx", "--external-data", "always"], tmp_path, tmp_path / "err")
    points = {
        "trace": lambda: b"exporting" in (tmp_path / "err").read_bytes(),
        "write": lambda: any(p.stat().st_size > 0 for p in out.glob(".big.onnx.*.tmp/big.onnx.data")),
        "graph": lambda: any(out.glob(".big.onnx.*.tmp/big.onnx")),
    }
    reached = _wait_for(proc, points[point])
    assert reached or point == "graph", (tmp_path / "err").read_text()
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    err = (tmp_path / "err").read_text()
    assert "Traceback" not in err, err
    left = sorted(p.name for p in out.iterdir())
    if code == 0:  # "graph" only: the export finished before the signal
        assert point == "graph" and left == ["big.onnx", "big.onnx.data"]
    else:
        assert code == 128 + sig, err
        assert "interrupted" in err.strip().splitlines()[-1]
        # nothing partial: no temporary folder, and the output is complete or absent
        assert left in ([], ["big.onnx", "big.onnx.data"]), left


def test_sigterm_during_convert_leaves_nothing(big, tmp_path):
    proc = _spawn(["convert", big / "model.safetensors", "-o", tmp_path / "out", "--top-k", 2], tmp_path, tmp_path / "err")
    # config.json is written first, then 64 MiB of weights: the signal lands while they are written
    assert _wait_for(proc, lambda: any(tmp_path.glob(".out.*.tmp/out/config.json")))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    left = sorted(p.name for p in tmp_path.iterdir())
    # no temporary folder; the output is absent, or complete if the signal came while it was moved into place
    assert left == ["err"] or (left == ["err", "out"] and OmniMoELayer.from_pretrained(tmp_path / "out")), left


def test_a_signal_in_exit_hooks_is_not_a_traceback(assets, tmp_path):
    code = ("import atexit, os, signal, sys\nfrom deploy.cli import main\n"
            "atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT))\nsys.exit(main())")
    proc = subprocess.run([sys.executable, "-c", code, "run", str(assets / "ck"), "--input", str(assets / "x.npy"), "-o",
                           str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert proc.returncode == 128 + signal.SIGINT
    assert np.load(tmp_path / "y.npy").shape == (2, 5, 8)  # the command itself had finished


# ---------------------------------------------------------------------------------------------
# Concurrent writers of one output
# ---------------------------------------------------------------------------------------------
_WRITER = """
import sys, time
from pathlib import Path
import deploy.cli, omnimoe.checkpoint, safetensors.torch  # imported before the start line
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():
    time.sleep(0.0002)
sys.exit(deploy.cli.main(sys.argv[3:]))
"""


def _race(tmp_path, commands):
    """Start the commands at the same instant; [(exit code, stderr)]."""
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / f"ready{i}"), str(go), *map(str, cmd)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i, cmd in enumerate(commands)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(len(commands))):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    go.touch()
    return [(p.wait(timeout=120), p.stderr.read()) for p in procs]


def _upstream_variant(work, seed, name):
    torch.manual_seed(seed)
    layer = OmniMoELayer(OmniMoEConfig(**LAYER)).eval()
    save_file({k: v.contiguous() for k, v in layer.state_dict().items()}, str(work / name))
    return work / name


@pytest.mark.parametrize("overwrite", [False, True])
def test_concurrent_converts_end_with_one_complete_result(overwrite, work):
    sources = [_upstream_variant(work, seed, f"s{seed}.safetensors") for seed in range(3)]
    out = work / "out"
    if overwrite:
        _dir_with_file(work, "out")
    flag = ["--overwrite"] if overwrite else []
    results = _race(work, [["convert", src, "-o", out, "--top-k", 2 + i, *flag] for i, src in enumerate(sources)])
    for code, err in results:
        assert code in (0, 2), err
        assert "Traceback" not in err
        if code == 2:
            assert len(err.strip().splitlines()) == 1, err
    assert any(code == 0 for code, _ in results)
    # one complete result: config and weights of the same writer, never a mix
    layer = OmniMoELayer.from_pretrained(out)
    writer = layer.config.top_k - 2
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in load_file(str(sources[writer])).items())
    assert results[writer][0] == 0
    assert not temp_leftovers(work)
    assert (out / "keep.txt").exists() == overwrite


def test_concurrent_exports_end_with_one_complete_model(work):
    for seed in (1, 2):
        _upstream_variant(work, seed, f"s{seed}.safetensors")
        assert cli(["convert", str(work / f"s{seed}.safetensors"), "-o", str(work / f"c{seed}"), "--top-k", "2"]) == 0
    results = _race(work, [["export", work / f"c{seed}", "-o", work / "m.onnx", "--external-data", "always"] for seed in (1, 2)])
    assert all(code == 0 for code, _ in results), results
    from export.ort import ort_session

    x = np.load(work / "x.npy")
    y = ort_session(work / "m.onnx").run(None, {"x": x})[0]
    expected = [OmniMoELayer.from_pretrained(work / f"c{seed}")(torch.from_numpy(x)).detach().numpy() for seed in (1, 2)]
    assert any(np.allclose(y, e, atol=1e-5) for e in expected), "the graph and its data come from different exports"
    assert not temp_leftovers(work)


# ---------------------------------------------------------------------------------------------
# Property-based: exit 0 with a correct result, or exit 2 with one line; never a traceback,
# never a partial file
# ---------------------------------------------------------------------------------------------
_HOSTILE = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)
_PLAUSIBLE = {
    "hidden_size": [8, 4, 0, -8], "num_experts": [16, 25, 1, 0], "top_k": [1, 2, 3, 16, 17, 0],
    "intermediate_size": [8, 0, 4], "hidden_act": ["silu", "gelu", "relu", "gelu_tanh", "tanh"],
    "router_norm": ["batchnorm", "none"], "gate": ["product", "softmax", "exp"], "norm_eps": [1e-5, 1e-3, 0.5, 0.0, -1e-5],
}


@st.composite
def configs(draw):
    data = {"model_type": "omnimoe_layer", **LAYER, "hidden_act": "silu", "router_norm": "batchnorm", "gate": "product",
            "norm_eps": 1e-5}
    for field, plausible in _PLAUSIBLE.items():
        choice = draw(st.integers(0, 5))
        if choice == 0:
            data[field] = draw(_HOSTILE)
        elif choice == 1:
            data[field] = draw(st.sampled_from(plausible))
        elif choice == 2 and draw(st.booleans()):
            del data[field]
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(min_size=1, max_size=4))] = draw(_HOSTILE)
    return data


def _outcome_ok(code, err, out_path, tmp):
    assert code in (0, 2), err
    assert "Traceback" not in err
    assert not temp_leftovers(tmp)
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
        assert not out_path.exists(), "a failed command left an output"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=configs())
def test_fuzzed_config_json(data, assets, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(assets / "ck", tmp / "ck")
        (tmp / "ck" / "config.json").write_text(json.dumps(data))
        out = tmp / "y.npy"
        code, _, err = run_cli(["run", tmp / "ck", "--input", assets / "x.npy", "-o", out], capsys)
        _outcome_ok(code, err, out, tmp)
        event(f"exit {code}")
        if code == 0:
            config = OmniMoEConfig.from_dict(data)
            weights = load_file(str(assets / "ck" / "model.safetensors"))
            reference = types.SimpleNamespace(config=config, state_dict=lambda: weights)
            expected = naive_layer(reference, torch.from_numpy(np.load(assets / "x.npy")))
            np.testing.assert_allclose(np.load(out), expected.numpy(), atol=1e-5, rtol=1e-5)


_MEMBER = st.one_of(
    st.just("valid"), st.just("object"), st.just("garbage"), st.just("not-npy"),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.one_of(st.tuples(st.integers(0, 3), st.integers(0, 5), st.just(8)), st.lists(st.integers(0, 5), max_size=4).map(tuple)),
    dtype=st.sampled_from([np.float32, np.float16, np.float64, np.int32, np.bool_, np.complex64]),
    special=st.sampled_from([None, np.nan, np.inf]),
    extras=st.lists(_MEMBER, max_size=2),
)
def test_fuzzed_layer_inputs(shape, dtype, special, extras, assets, capsys):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(dtype) if np.dtype(dtype).kind != "b" else rng.random(shape) > 0.5
    if special is not None and x.size and np.dtype(dtype).kind in "fc":
        x.flat[0] = special
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        members = {"x.npy": _npy_bytes(x)}
        for i, kind in enumerate(extras):
            members[f"e{i}.npy" if kind != "not-npy" else f"e{i}.txt"] = {
                "valid": _npy_bytes(np.zeros(3)), "object": _npy_bytes(np.array([None], dtype=object)),
                "garbage": b"\x93NUMPY\x01\x00garbage", "not-npy": b"hello",
            }[kind]
        path = _npz_raw(tmp, members)
        out = tmp / "y.npy"
        code, _, err = run_cli(["run", assets / "ck", "--input", path, "-o", out], capsys)
        _outcome_ok(code, err, out, tmp)
        event(f"exit {code}")
        bad_member = any(kind != "valid" for kind in extras)
        fits = len(shape) == 3 and shape[-1] == 8 and np.dtype(dtype).kind == "f"
        assert (code == 0) == (fits and not bad_member), err
        if code == 0:
            layer = OmniMoELayer.from_pretrained(assets / "ck")
            x32 = x.astype(np.float32)
            expected = naive_layer(layer, torch.from_numpy(x32)).numpy()
            finite = np.isfinite(x32).all(axis=-1)  # tokens with NaN/Inf inputs: no finite answer to compare
            y = np.load(out)
            assert y.shape == x.shape and not np.isfinite(y[~finite]).all(axis=-1).any()
            np.testing.assert_allclose(y[finite], expected[finite], atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.integers(0, 3), seq=st.integers(0, 10), low=st.integers(-2, 10), high=st.integers(0, 14),
       dtype=st.sampled_from([np.int64, np.int32, np.uint8, np.float32]))
def test_fuzzed_token_ids_for_an_onnx_lm(batch, seq, low, high, dtype, assets, capsys):
    ids = np.random.default_rng(0).integers(min(low, high), max(low, high) + 1, size=(batch, seq))
    if np.dtype(dtype).kind == "u":
        ids = np.abs(ids)
    ids = ids.astype(dtype)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        np.save(tmp / "ids.npy", ids)
        out = tmp / "y.npy"
        code, _, err = run_cli(["run", assets / "lm.onnx", "--input", tmp / "ids.npy", "-o", out], capsys)
        _outcome_ok(code, err, out, tmp)
        event(f"exit {code}")
        valid = np.dtype(dtype).kind in "iu" and seq <= 6 and (ids.size == 0 or (ids.min() >= 0 and ids.max() < 11))
        assert (code == 0) == valid, err
        if code == 0:
            lm = TinyOmniLM.from_pretrained(assets / "lm")
            with torch.no_grad():
                expected = lm(torch.from_numpy(ids.astype(np.int64))).numpy()
            np.testing.assert_allclose(np.load(out), expected, atol=1e-4, rtol=1e-4)
