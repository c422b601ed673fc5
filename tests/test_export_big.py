"""The >2 GB export (issue 4): N = 1 048 576 experts, d = 1024, fp16 -> two 2 GiB expert tables.

`omnimoe export` must write both graphs with external data on a 24 GB machine, pass
onnx.checker (full check, by path) and strict shape inference, and ONNX Runtime must run both
graphs from the external data. Each step runs in its own process so that the export's
peak RSS (ru_maxrss of that process) is measured alone; the measurements are printed.

Routing is made decisive by construction (identity router rows and well-separated input values),
so the fp16 comparison between PyTorch and ONNX Runtime is not at the mercy of near-ties.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

N, D, K, INTER = 1 << 20, 1024, 16, 256
S = 1024  # grid side; router rows i < 512 read x[i] (x axis), rows j < 512 read x[512 + j] (y axis)
HALF = 512
TABLE_BYTES = N * D * 2
GIB = 1 << 30
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Worker entry points (run as `python tests/test_export_big.py <command> ...`)
# ---------------------------------------------------------------------------------------------
def _make_checkpoint(directory: str) -> None:
    import torch

    from omnimoe.config import OmniMoEConfig
    from omnimoe.layer import OmniMoELayer

    config = OmniMoEConfig(hidden_size=D, num_experts=N, top_k=K, intermediate_size=INTER)
    with torch.device("meta"):
        layer = OmniMoELayer(config, dtype=torch.float16)
    layer = layer.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for table in (layer.up_embed.weight, layer.down_embed.weight):
            for start in range(0, N, 1 << 16):  # 128 MiB at a time
                rows = table[start : start + (1 << 16)]
                rows.copy_(torch.randint(-127, 128, rows.shape, generator=gen, dtype=torch.int16).to(torch.float16) / 4096)
        for linear in (layer.gate_proj, layer.up_proj, layer.down_proj):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen) * 0.02)
        for linear, column in ((layer.router_gate_x, 0), (layer.router_gate_y, HALF)):
            linear.weight.zero_()
            linear.weight[torch.arange(HALF), column + torch.arange(HALF)] = 1.0
        for bn in (layer.router_norm_x, layer.router_norm_y):
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0)
            bn.num_batches_tracked.zero_()
    layer.save_pretrained(directory)


def _export(argv: list[str]) -> None:
    import resource

    from deploy.cli import main

    start = time.perf_counter()
    rc = main(argv)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print("MEASURED " + json.dumps({"rc": rc, "seconds": seconds, "peak_rss_bytes": peak}))
    sys.exit(rc)


def _decisive_input(tokens: int) -> np.ndarray:
    """x whose top-16 experts are unambiguous: x-axis values 10 - 0.5 i, y-axis 10 - 0.5 j / 17
    at random positions, so all candidate sums differ by >= 0.5/17; everything else ~ -5."""
    rng = np.random.default_rng(1)
    x = rng.uniform(-6.0, -4.0, size=(1, tokens, D)).astype(np.float32)
    for t in range(tokens):
        xs = rng.choice(HALF, size=K, replace=False)
        ys = HALF + rng.choice(HALF, size=K, replace=False)
        x[0, t, xs] = 10.0 - 0.5 * np.arange(K)
        x[0, t, ys] = 10.0 - 0.5 * np.arange(K) / 17.0
    return x.astype(np.float16)


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------
def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("big") / "ckpt"
    proc = _run(["make-checkpoint", str(directory)], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    yield directory
    shutil.rmtree(directory, ignore_errors=True)  # 4 GiB: do not leave it to pytest's tmp rotation


@pytest.fixture
def onnx_out(tmp_path):
    """Where one export goes; its 4 GiB of external data is removed after the test."""
    yield tmp_path
    for f in tmp_path.glob("*.onnx*"):
        f.unlink()


@pytest.mark.parametrize("ops", ["plugin", "standard"])
def test_export_two_2gib_fp16_tables(big_checkpoint, onnx_out, ops, capsys):
    import onnx

    from export import schemas
    from export.onnx_export import check_onnx_file

    out = onnx_out / f"big_{ops}.onnx"
    proc = _run(["export", "export", str(big_checkpoint), "-o", str(out), "--ops", ops, "--dtype", "fp16"], timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("MEASURED "))[9:])
    with capsys.disabled():
        print(
            f"\n[big export, {ops}] N={N} d={D} fp16 (2 x {TABLE_BYTES / GIB:.1f} GiB): "
            f"{measured['seconds']:.1f} s, peak RSS {measured['peak_rss_bytes'] / GIB:.2f} GiB"
        )
    # Never more than about two copies of the 4 GiB of tables in memory.
    assert measured["peak_rss_bytes"] < 2 * 2 * TABLE_BYTES + 2 * GIB

    data = out.with_name(out.name + ".data")
    assert data.is_file() and data.stat().st_size >= 2 * TABLE_BYTES
    assert out.stat().st_size < 1 << 20  # the graph alone; weights are external
    check_onnx_file(out)  # full check by path + strict shape inference (the exporter ran it too)

    model = onnx.load(str(out), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    # Spot-check rows of the external tables against the checkpoint, byte for byte.
    from safetensors import safe_open

    with safe_open(str(big_checkpoint / "model.safetensors"), framework="np") as f:
        for name in ("up_embed.weight", "down_embed.weight"):
            init = inits[name]
            assert list(init.dims) == [N, D] and init.data_type == onnx.TensorProto.FLOAT16
            info = {e.key: e.value for e in init.external_data}
            assert info["location"] == data.name and int(info["length"]) == TABLE_BYTES
            table = np.memmap(data, dtype=np.float16, mode="r", offset=int(info["offset"]), shape=(N, D))
            for row in (0, 123457, N - 1):
                np.testing.assert_array_equal(table[row], f.get_slice(name)[row : row + 1][0])
            del table

    custom = [(n.domain, n.op_type) for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    if ops == "plugin":
        schemas.register_onnx_schemas()
        assert custom == [("omnimoe", "OmniProductKeyTopK"), ("omnimoe", "OmniExpertGroupedMatMul")]
    else:
        assert custom == []

    # ONNX Runtime runs the graph straight from the external data (the plugin graph through the
    # onnxruntime-extensions ops, reading only the routed rows of the fp16 tables).
    import torch

    from export.ort import ort_session
    from omnimoe.checkpoint import load_checkpoint

    start = time.perf_counter()
    session = ort_session(out)
    x = _decisive_input(4)
    got = session.run(None, {"x": x})[0].astype(np.float32)
    ort_seconds = time.perf_counter() - start
    layer = load_checkpoint(big_checkpoint)
    with torch.no_grad():
        xt = torch.from_numpy(x)
        _, indices = layer.route(xt.reshape(-1, D))
        expected = layer(xt).float().numpy()
    with capsys.disabled():
        print(f"[big export, {ops}] ONNX Runtime session + run of 4 tokens: {ort_seconds:.1f} s")
    # The decisive input routes every token to 16 distinct experts spread over the table.
    assert len(set(indices.flatten().tolist())) == 4 * K
    scale = float(np.abs(expected).max())
    assert scale > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-2 * scale, rtol=1e-2)


if __name__ == "__main__":
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "make-checkpoint":
        _make_checkpoint(rest[0])
    elif command == "export":
        _export(rest)
    else:
        raise SystemExit(f"unknown command {command!r}")
