"""Checkpoint round trip, upstream import, and every bad input of issue 2 item 4."""
import json
import math
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from deploy.cli import main as cli
from naive import naive_layer
from omnimoe import OmniMoEConfig, OmniMoEInputError, OmniMoELayer
from omnimoe.checkpoint import load_checkpoint


def upstream_state_dict(d=16, inter=24, N=25, batchnorm=True, seed=0):
    """What flash-algo/omni-moe's OmniMoE.state_dict() holds, built by hand from its key names."""
    g = torch.Generator().manual_seed(seed)
    s = math.isqrt(N)
    sd = {
        "gate_proj.weight": torch.randn(inter, d, generator=g) * 0.2,
        "up_proj.weight": torch.randn(inter, d, generator=g) * 0.2,
        "down_proj.weight": torch.randn(d, inter, generator=g) * 0.2,
        "router_gate_x.weight": torch.randn(s, d, generator=g),
        "router_gate_y.weight": torch.randn(s, d, generator=g),
        "up_embed.weight": torch.randn(N, d, generator=g),
        "down_embed.weight": torch.randn(N, d, generator=g),
    }
    if batchnorm:
        for axis in "xy":
            sd[f"router_norm_{axis}.running_mean"] = torch.randn(s, generator=g) * 0.1
            sd[f"router_norm_{axis}.running_var"] = torch.rand(s, generator=g) + 0.5
            sd[f"router_norm_{axis}.num_batches_tracked"] = torch.tensor(100)
    return sd


def prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def run_cli(args, capsys):
    code = cli([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_round_trip_bit_exact(tmp_path):
    cfg = OmniMoEConfig(hidden_size=16, num_experts=36, top_k=5, intermediate_size=8, gate="softmax")
    layer = OmniMoELayer(cfg).eval()
    layer.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    again = OmniMoELayer.from_pretrained(tmp_path / "ck")
    assert again.config == cfg
    for k, v in layer.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    x = torch.randn(7, 16)
    assert torch.equal(layer(x), again(x))


def test_convert_without_prefix_matches_upstream_math(tmp_path, capsys):
    sd = upstream_state_dict()
    save_file(sd, tmp_path / "up.safetensors")
    code, out, err = run_cli(["convert", tmp_path / "up.safetensors", "-o", tmp_path / "ck", "--top-k", 6], capsys)
    assert code == 0, err
    layer = OmniMoELayer.from_pretrained(tmp_path / "ck")
    assert layer.config.num_experts == 25 and layer.config.intermediate_size == 24 and layer.config.router_norm == "batchnorm"
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), naive_layer(layer, x), rtol=1e-5, atol=1e-5)
    # Upstream's own forward (exp gate, BatchNorm eval statistics), written out for one token:
    lx = (x @ sd["router_gate_x.weight"].T - sd["router_norm_x.running_mean"]) / torch.sqrt(sd["router_norm_x.running_var"] + 1e-5)
    ly = (x @ sd["router_gate_y.weight"].T - sd["router_norm_y.running_mean"]) / torch.sqrt(sd["router_norm_y.running_var"] + 1e-5)
    scores = (lx.log_softmax(-1)[:, :, None] + ly.log_softmax(-1)[:, None, :]).flatten(1)
    top, idx = scores.topk(6)
    h = torch.nn.functional.silu(torch.einsum("tkd,td->tk", sd["up_embed.weight"][idx], x)) * top.exp()
    routed = torch.einsum("tk,tkd->td", h, sd["down_embed.weight"][idx])
    shared = torch.nn.functional.silu(x @ sd["gate_proj.weight"].T) * (x @ sd["up_proj.weight"].T) @ sd["down_proj.weight"].T
    with torch.no_grad():
        torch.testing.assert_close(layer(x), shared + routed, rtol=1e-4, atol=1e-4)


def test_convert_with_prefix_and_all_layers(tmp_path, capsys):
    sd = {"model.embed.weight": torch.randn(10, 16)}
    for i in range(3):
        sd.update(prefixed(upstream_state_dict(seed=i, batchnorm=i != 1), f"model.layers.{i}.mlp."))
        sd[f"model.layers.{i}.attn.q.weight"] = torch.randn(16, 16)
    save_file(sd, tmp_path / "full.safetensors")
    src = tmp_path / "full.safetensors"

    code, _, err = run_cli(["convert", src, "-o", tmp_path / "one", "--top-k", 3], capsys)
    assert code == 2 and "found 3 OmniMoE layers" in err and not (tmp_path / "one").exists()

    code, _, err = run_cli(["convert", src, "-o", tmp_path / "one", "--top-k", 3, "--prefix", "model.layers.1.mlp."], capsys)
    assert code == 0, err
    layer = OmniMoELayer.from_pretrained(tmp_path / "one")
    assert layer.config.router_norm == "none"
    assert torch.equal(layer.up_embed.weight, sd["model.layers.1.mlp.up_embed.weight"])

    code, _, err = run_cli(["convert", src, "-o", tmp_path / "all", "--top-k", 3, "--prefix", "model.layers.*.mlp."], capsys)
    assert code == 0, err
    index = json.loads((tmp_path / "all" / "layers.json").read_text())
    assert sorted(index["layers"]) == [f"model.layers.{i}.mlp." for i in range(3)]
    for i in range(3):
        layer = OmniMoELayer.from_pretrained(tmp_path / "all" / f"model.layers.{i}.mlp")
        assert torch.equal(layer.down_embed.weight, sd[f"model.layers.{i}.mlp.down_embed.weight"])


def test_pickle_needs_opt_in(tmp_path, capsys):
    torch.save(upstream_state_dict(), tmp_path / "up.pt")
    code, _, err = run_cli(["convert", tmp_path / "up.pt", "-o", tmp_path / "ck", "--top-k", 2], capsys)
    assert code == 2 and "--allow-pickle" in err and not (tmp_path / "ck").exists()
    code, _, err = run_cli(["convert", tmp_path / "up.pt", "-o", tmp_path / "ck", "--top-k", 2, "--allow-pickle"], capsys)
    assert code == 0, err
    assert OmniMoELayer.from_pretrained(tmp_path / "ck").config.top_k == 2


def _bad(sd_change):
    sd = upstream_state_dict()
    sd_change(sd)
    return sd


BAD_INPUTS = {
    "missing key": (lambda sd: sd.pop("router_gate_y.weight"), "missing keys"),
    "unexpected key": (lambda sd: sd.update({"router_gate_z.weight": torch.zeros(5, 16)}), "unexpected keys"),
    "wrong shape": (lambda sd: sd.update({"down_embed.weight": torch.zeros(25, 15)}), "has shape"),
    "wrong router shape": (lambda sd: sd.update({"router_gate_x.weight": torch.zeros(4, 16)}), "has shape"),
    "N not square": (
        lambda sd: sd.update({"up_embed.weight": torch.zeros(24, 16), "down_embed.weight": torch.zeros(24, 16)}),
        "not a perfect square",
    ),
    "NaN weight": (lambda sd: sd["up_embed.weight"].__setitem__((3, 4), float("nan")), "NaN or Inf"),
    "Inf weight": (lambda sd: sd["gate_proj.weight"].__setitem__((0, 0), float("inf")), "NaN or Inf"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_upstream_checkpoints_exit_2(case, tmp_path, capsys):
    change, message = BAD_INPUTS[case]
    save_file(_bad(change), tmp_path / "bad.safetensors")
    code, out, err = run_cli(["convert", tmp_path / "bad.safetensors", "-o", tmp_path / "ck", "--top-k", 3], capsys)
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "ck").exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.safetensors"]


def test_k_above_n_and_truncated_file(tmp_path, capsys):
    save_file(upstream_state_dict(), tmp_path / "up.safetensors")
    code, _, err = run_cli(["convert", tmp_path / "up.safetensors", "-o", tmp_path / "ck", "--top-k", 26], capsys)
    assert code == 2 and "exceeds the number of experts" in err
    data = (tmp_path / "up.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run_cli(["convert", tmp_path / "cut.safetensors", "-o", tmp_path / "ck", "--top-k", 3], capsys)
    assert code == 2 and "safetensors" in err and err.count("\n") == 1
    assert not (tmp_path / "ck").exists()


def test_native_checkpoint_corruption(tmp_path):
    layer = OmniMoELayer(OmniMoEConfig(hidden_size=8, num_experts=16, top_k=2))
    layer.save_pretrained(tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(OmniMoEInputError):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "ck" / "config.json").write_text("{not json")
    with pytest.raises(OmniMoEInputError, match="not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    with pytest.raises(OmniMoEInputError, match="not a checkpoint directory"):
        load_checkpoint(tmp_path / "nowhere")


def test_cli_error_has_no_traceback_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "convert", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "o"), "--top-k", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no such file" in proc.stderr
