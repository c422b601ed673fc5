"""Checkpoint directories and sharded safetensors (model.safetensors.index.json), issue 13 item 7."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from omnimoe import OmniMoEConfig, OmniMoELayer
from omnimoe.checkpoint import load_checkpoint
from omnimoe.models import TinyOmniLM
from omnimoe.train import tiny_config
from test_checkpoint import prefixed, run_cli, upstream_state_dict


def write_sharded(directory, state: dict, n_shards: int) -> dict:
    """Hugging Face's layout: round-robin the keys over n shards (so one layer spans several) plus
    model.safetensors.index.json mapping every key to its shard file. Returns the weight_map."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map = {key: names[i % n_shards] for i, key in enumerate(sorted(state))}
    for name in names:
        save_file({k: v.contiguous() for k, v in state.items() if weight_map[k] == name}, str(directory / name))
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


@pytest.fixture
def full_model(tmp_path):
    """A full-model checkpoint with three OmniMoE layers (different sizes) and other weights, in 3 shards."""
    state = {"model.embed_tokens.weight": torch.randn(10, 16)}
    layers = {}
    for i, n in enumerate((25, 36, 16)):
        layers[i] = upstream_state_dict(N=n, seed=i)
        state.update(prefixed(layers[i], f"model.layers.{i}.mlp."))
    weight_map = write_sharded(tmp_path / "hf", state, 3)
    return tmp_path / "hf", layers, weight_map


def _same_tensors(ckpt_dir, expected: dict):
    layer = OmniMoELayer.from_pretrained(ckpt_dir)
    got = layer.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    return layer


def test_convert_one_layer_across_shards(full_model, tmp_path, capsys):
    src, layers, weight_map = full_model
    shards_of_layer_1 = {weight_map[k] for k in weight_map if k.startswith("model.layers.1.mlp.")}
    assert len(shards_of_layer_1) == 3  # the layer really is spread over every shard
    for source in (src, src / "model.safetensors.index.json"):
        out = tmp_path / f"layer1-{source.name}"
        code, _, err = run_cli(["convert", source, "-o", out, "--top-k", 4, "--prefix", "model.layers.1.mlp."], capsys)
        assert code == 0, err
        layer = _same_tensors(out, layers[1])
        assert layer.config.num_experts == 36 and layer.config.top_k == 4


def test_convert_every_layer_across_shards(full_model, tmp_path, capsys):
    src, layers, _ = full_model
    code, _, err = run_cli(["convert", src, "-o", tmp_path / "all", "--top-k", 3, "--prefix", "model.layers.*.mlp."], capsys)
    assert code == 0, err
    index = json.loads((tmp_path / "all" / "layers.json").read_text())
    assert sorted(index["layers"]) == [f"model.layers.{i}.mlp." for i in range(3)]
    for i in range(3):
        _same_tensors(tmp_path / "all" / f"model.layers.{i}.mlp", layers[i])
    # Without --prefix, the layers found across all shards are listed.
    code, _, err = run_cli(["convert", src, "-o", tmp_path / "none", "--top-k", 3], capsys)
    assert code == 2 and "found 3 OmniMoE layers" in err and not (tmp_path / "none").exists()


def test_convert_directory_with_one_file(tmp_path, capsys):
    sd = upstream_state_dict()
    (tmp_path / "up").mkdir()
    save_file(sd, str(tmp_path / "up" / "weights.safetensors"))
    code, _, err = run_cli(["convert", tmp_path / "up", "-o", tmp_path / "ck", "--top-k", 2], capsys)
    assert code == 0, err
    _same_tensors(tmp_path / "ck", sd)


def test_from_pretrained_reads_a_sharded_native_checkpoint(tmp_path):
    torch.manual_seed(0)
    layer = OmniMoELayer(OmniMoEConfig(hidden_size=16, num_experts=36, top_k=4, intermediate_size=8)).eval()
    layer.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    write_sharded(tmp_path / "ck", layer.state_dict(), 2)
    again = OmniMoELayer.from_pretrained(tmp_path / "ck")
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), again(x))
    lm = TinyOmniLM(tiny_config("abcdef ")).eval()
    lm.save_pretrained(tmp_path / "lm")
    (tmp_path / "lm" / "model.safetensors").unlink()
    write_sharded(tmp_path / "lm", lm.state_dict(), 3)
    ids = torch.randint(0, 7, (1, 6))
    assert torch.equal(lm(ids), load_checkpoint(tmp_path / "lm")(ids))


def test_bad_shard_indexes_are_one_line_exit_2(full_model, tmp_path, capsys):
    src, _, weight_map = full_model
    index = src / "model.safetensors.index.json"
    good = index.read_text()
    key = next(iter(weight_map))
    other_shard = next(s for s in set(weight_map.values()) if s != weight_map[key])
    cases = {
        "not json": ("{", "not a readable safetensors index"),
        "no weight_map": (json.dumps({"metadata": {}}), "weight_map"),
        "missing shard": (json.dumps({"weight_map": {**weight_map, key: "gone.safetensors"}}), "no such file"),
        "wrong shard": (json.dumps({"weight_map": {**weight_map, key: other_shard}}), "which does not hold it"),
        "path escape": (json.dumps({"weight_map": {**weight_map, key: "../x.safetensors"}}), "file name next to the index"),
    }
    for name, (text, words) in cases.items():
        index.write_text(text)
        code, _, err = run_cli(["convert", src, "-o", tmp_path / "out", "--top-k", 2, "--prefix", "model.layers.0.mlp."], capsys)
        assert code == 2 and err.count("\n") == 1 and words in err, (name, err)
        assert not (tmp_path / "out").exists()
    index.write_text(good)
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["convert", tmp_path / "empty", "-o", tmp_path / "out", "--top-k", 2], capsys)
    assert code == 2 and "model.safetensors.index.json" in err


def _mapped_file(address: int) -> str | None:
    """The file a process address is mapped from (Linux /proc/self/maps), None for anonymous memory."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= address < hi:
                return fields[5] if len(fields) > 5 and fields[5].startswith("/") else None
    return None


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_sharded_tables_stay_memory_mapped(tmp_path):
    """Every weight of a sharded checkpoint is the shard file's memory map, not a copy in RAM."""
    torch.manual_seed(0)
    layer = OmniMoELayer(OmniMoEConfig(hidden_size=64, num_experts=1024, top_k=4, intermediate_size=32)).eval()
    layer.save_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    weight_map = write_sharded(tmp_path / "ck", layer.state_dict(), 3)
    again = OmniMoELayer.from_pretrained(tmp_path / "ck")
    for name, tensor in again.state_dict().items():
        if tensor.numel() > 1:
            assert _mapped_file(tensor.data_ptr()) == str(tmp_path / "ck" / weight_map[name]), name
