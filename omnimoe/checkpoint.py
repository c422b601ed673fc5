"""Checkpoints: native directories (config.json + model.safetensors) and upstream import.

Native layout (SPEC §2): keys as in the upstream flash-algo/omni-moe module. Tensors are read
through safetensors' memory map and attached to a meta-device module with `assign=True`, so a
table is never held twice in RAM.

Upstream import (`convert_upstream`): a state_dict from flash-algo/omni-moe `OmniMoE`, possibly
inside a full-model checkpoint under a prefix such as `model.layers.3.mlp.`. One layer converts to
one checkpoint directory; a prefix with `*` (`model.layers.*.mlp.`) converts every matching layer
into its own sub-directory `OUT/<prefix without trailing dot>/` plus an index `OUT/layers.json`.

Both read a weights file or a directory: `model.safetensors`, or shards listed in
`model.safetensors.index.json` (Hugging Face's convention: `weight_map` key -> shard file), each
shard memory-mapped (`open_weights`).
"""
from __future__ import annotations

import fnmatch
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_path, check_output
from .config import OmniMoEConfig
from .errors import OmniMoEInputError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
_BN_COUNTER = "num_batches_tracked"
# Checking finiteness row-block by row-block keeps the temporary bool mask small for huge tables.
_FINITE_CHECK_ELEMENTS = 1 << 24
# A config whose tensors exceed this cannot be a real checkpoint (x86-64 user address space is 128 TiB).
MAX_WEIGHT_BYTES = 1 << 47


# ---------------------------------------------------------------------------------------------
# Weight-file access: safetensors (default) or pickle (explicit opt-in only)
# ---------------------------------------------------------------------------------------------
class _TensorSource:
    """Lazy name -> tensor access to a weights file, with shapes known before loading."""

    def __init__(self, path: Path, allow_pickle: bool = False):
        self.path = path
        if not path.is_file():
            raise OmniMoEInputError(f"{path}: no such file")
        if path.suffix == ".safetensors":
            try:
                self._file = safe_open(str(path), framework="pt")
                self._shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
            except (SafetensorError, OSError, ValueError) as e:
                raise OmniMoEInputError(f"{path}: not a readable safetensors file ({e})") from None
            self._get = self._file.get_tensor
        elif path.suffix in (".pt", ".bin", ".pth"):
            if not allow_pickle:
                raise OmniMoEInputError(
                    f"{path}: pickle checkpoints can run code when loaded; pass --allow-pickle to load it with weights_only=True"
                )
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for corrupt/unsafe pickles
                first = (str(e).strip().splitlines() or [""])[0]  # the rest is torch's advice on weights_only
                raise OmniMoEInputError(f"{path}: cannot load with weights_only=True ({type(e).__name__}: {first})") from None
            if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
                state = state["state_dict"]
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise OmniMoEInputError(f"{path}: expected a state_dict of tensors")
            bad_keys = [k for k in state if not isinstance(k, str)]
            if bad_keys:
                raise OmniMoEInputError(f"{path}: state_dict keys must be strings, found {type(bad_keys[0]).__name__} {bad_keys[0]!r:.40}")
            self._shapes = {k: tuple(v.shape) for k, v in state.items()}
            self._get = state.__getitem__
        else:
            raise OmniMoEInputError(f"{path}: unsupported weights format (expected .safetensors, or .pt/.bin with --allow-pickle)")

    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def get(self, key: str) -> torch.Tensor:
        try:
            return self._get(key)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise OmniMoEInputError(f"{self.path}: cannot read tensor {key!r} ({e})") from None


def _check_finite(name: str, t: torch.Tensor, where: Path) -> None:
    if not t.is_floating_point():
        return
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _FINITE_CHECK_ELEMENTS):
        if not torch.isfinite(flat[start : start + _FINITE_CHECK_ELEMENTS]).all():
            raise OmniMoEInputError(f"{where}: tensor {name!r} contains NaN or Inf")


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype_and_range(name: str, key: str, t: torch.Tensor, where: Path) -> None:
    """Weights are float32/float16/bfloat16; BatchNorm variances are >= 0."""
    if name.endswith(_BN_COUNTER):
        return
    if t.dtype not in WEIGHT_DTYPES:
        raise OmniMoEInputError(f"{where}: tensor {key!r} has dtype {str(t.dtype).removeprefix('torch.')}; "
                                "weights must be float32, float16 or bfloat16")
    if name.endswith("running_var") and bool((t < 0).any()):
        raise OmniMoEInputError(f"{where}: tensor {key!r} (a BatchNorm variance) has negative values")


def _load_validated(source: _TensorSource, expected: dict[str, tuple], key_of: dict[str, str]) -> dict[str, torch.Tensor]:
    """Load exactly the expected tensors (module name -> shape) from `source` (module name -> file key).

    BatchNorm's `num_batches_tracked` may be absent (it does not affect inference). Weights must be
    floating point and of one dtype (BatchNorm statistics may be float32 in a float16/bfloat16 model).
    """
    missing = [n for n in expected if key_of[n] not in source and not n.endswith(_BN_COUNTER)]
    if missing:
        raise OmniMoEInputError(f"{source.path}: missing keys: {', '.join(key_of[n] for n in missing)}")
    state = {}
    for name, shape in expected.items():
        key = key_of[name]
        if key not in source:
            state[name] = torch.zeros((), dtype=torch.long)
            continue
        if source.shape(key) != shape:
            raise OmniMoEInputError(f"{source.path}: {key} has shape {list(source.shape(key))}, expected {list(shape)}")
        tensor = source.get(key)
        _check_dtype_and_range(name, key, tensor, source.path)
        _check_finite(key, tensor, source.path)
        state[name] = tensor
    dtypes = {str(t.dtype).removeprefix("torch.") for n, t in state.items() if ".running_" not in n and not n.endswith(_BN_COUNTER)}
    if len(dtypes) > 1:
        raise OmniMoEInputError(f"{source.path}: weights mix dtypes {sorted(dtypes)}; convert them to one")
    return state


# ---------------------------------------------------------------------------------------------
# Native checkpoints
# ---------------------------------------------------------------------------------------------
def save_module(module: nn.Module, config: dict, directory) -> None:
    """Write config.json + model.safetensors atomically (the directory appears complete or not at all)."""
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(directory, overwrite=True) as tmp:  # replaces these two files only, never others
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})


def save_layer(layer, directory) -> None:
    save_module(layer, layer.config.to_dict(), directory)


def read_config(directory) -> dict:
    directory = Path(directory)
    if not directory.is_dir():
        raise OmniMoEInputError(f"{directory}: not a checkpoint directory")
    path = directory / CONFIG_FILE
    if path.is_dir():
        raise OmniMoEInputError(f"{path}: is a directory, not a JSON file")
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise OmniMoEInputError(f"{path}: no such file") from None
    except RecursionError:
        raise OmniMoEInputError(f"{path}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError, OSError) as e:  # JSONDecodeError, integers too long to read
        raise OmniMoEInputError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise OmniMoEInputError(f"{path}: expected a JSON object")
    return data


def _module_from_config(data: dict) -> nn.Module:
    kind = data.get("model_type", "omnimoe_layer")
    if kind == "omnimoe_layer":
        from .layer import OmniMoELayer

        return OmniMoELayer(OmniMoEConfig.from_dict(data))
    if kind == "tiny_omni_lm":
        from .models import TinyOmniLM, TinyOmniLMConfig

        return TinyOmniLM(TinyOmniLMConfig.from_dict(data))
    raise OmniMoEInputError(f"unknown model_type {kind!r} in {CONFIG_FILE}")


def _check_layer_count(directory: Path, data: dict, source) -> None:
    """A TinyOmniLM's num_layers must match its weights before that many blocks are built (a config
    saying 10**9 layers would otherwise take hours to be refused)."""
    layers = data.get("num_layers") if data.get("model_type") == "tiny_omni_lm" else None
    if isinstance(layers, int) and not isinstance(layers, bool):
        held = len({k.split(".")[1] for k in source.keys() if k.startswith("layers.") and k.count(".") > 1})
        if layers != held:
            raise OmniMoEInputError(f"{directory / CONFIG_FILE}: num_layers is {layers}, but the weights hold {held} layers")


def load_checkpoint(directory, backend: str | None = None, device=None, dtype=None) -> nn.Module:
    """Load an OmniMoELayer or TinyOmniLM checkpoint directory, in eval mode."""
    directory = Path(directory)
    data = read_config(directory)
    source = open_weights(directory)
    _check_layer_count(directory, data, source)
    try:
        with torch.device("meta"):
            module = _module_from_config(data)
    except (RuntimeError, OverflowError) as e:  # sizes whose byte count overflows
        raise OmniMoEInputError(f"{directory / CONFIG_FILE}: sizes too large to allocate ({type(e).__name__})") from None
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    need = sum(math.prod(shape) for shape in expected.values()) * 4
    if need > MAX_WEIGHT_BYTES:
        raise OmniMoEInputError(
            f"{directory / CONFIG_FILE}: these sizes need {need / 2**40:,.0f} TiB of float32 weights, "
            f"more than a machine can map ({MAX_WEIGHT_BYTES / 2**40:.0f} TiB)"
        )
    unexpected = sorted(set(source.keys()) - set(expected))
    if unexpected:
        raise OmniMoEInputError(f"{source.path}: unexpected keys: {', '.join(unexpected[:8])}")
    state = _load_validated(source, expected, {k: k for k in expected})
    module.load_state_dict(state, strict=True, assign=True)
    if device is not None or dtype is not None:
        module.to(device=device, dtype=dtype)
    if backend is not None:
        from .layer import OmniMoELayer

        for m in module.modules():
            if isinstance(m, OmniMoELayer):
                m.backend = backend
    return module.eval()


def load_layer(directory, backend: str = "reference", device=None, dtype=None):
    from .layer import OmniMoELayer

    module = load_checkpoint(directory, backend=backend, device=device, dtype=dtype)
    if not isinstance(module, OmniMoELayer):
        raise OmniMoEInputError(f"{directory} is not an OmniMoE layer checkpoint")
    return module


# ---------------------------------------------------------------------------------------------
# Upstream import
# ---------------------------------------------------------------------------------------------
_LAYER_MARKER = "up_embed.weight"


def find_layer_prefixes(keys) -> list[str]:
    """Every prefix P such that P + 'up_embed.weight' is a key: one per OmniMoE layer."""
    return sorted(k[: -len(_LAYER_MARKER)] for k in keys if k.endswith(_LAYER_MARKER))


def _select_prefixes(keys, prefix: str | None) -> list[str]:
    found = find_layer_prefixes(keys)
    if not found:
        raise OmniMoEInputError("no OmniMoE layer found (no key ending in 'up_embed.weight')")
    if prefix is None:
        if len(found) == 1:
            return found
        listed = ", ".join(repr(p) for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise OmniMoEInputError(
            f"found {len(found)} OmniMoE layers ({listed}); pick one with --prefix or all with a '*' pattern"
        )
    if "*" in prefix:
        matches = [p for p in found if fnmatch.fnmatchcase(p, prefix)]
    else:
        matches = [p for p in found if p == prefix]
    if not matches:
        raise OmniMoEInputError(f"no OmniMoE layer under prefix {prefix!r} (found: {', '.join(repr(p) for p in found[:4])})")
    return matches


def _infer_upstream_config(source: _TensorSource, prefix: str, top_k: int, act: str, gate: str) -> OmniMoEConfig:
    def shape(name):
        key = prefix + name
        return source.shape(key) if key in source else None

    up = shape("up_embed.weight")
    if up is None or len(up) != 2:
        raise OmniMoEInputError(f"{prefix}up_embed.weight must be a 2-D [N, d] table")
    n, d = up
    gate_proj = shape("gate_proj.weight")
    inter = gate_proj[0] if gate_proj is not None and len(gate_proj) == 2 else 0
    router_norm = "batchnorm" if shape("router_norm_x.running_mean") is not None else "none"
    s = math.isqrt(n)
    if s * s != n:
        raise OmniMoEInputError(f"{prefix}up_embed.weight has N={n} experts, which is not a perfect square")
    if top_k > n:
        raise OmniMoEInputError(f"--top-k {top_k} exceeds the number of experts N={n}")
    return OmniMoEConfig(
        hidden_size=d, num_experts=n, top_k=top_k, intermediate_size=inter, hidden_act=act, router_norm=router_norm, gate=gate
    )


def _layer_state_from_upstream(source: _TensorSource, prefix: str, config: OmniMoEConfig) -> dict[str, torch.Tensor]:
    from .layer import OmniMoELayer

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in OmniMoELayer(config).state_dict().items()}
    under_prefix = {k for k in source.keys() if k.startswith(prefix)}
    # Keys of nested OmniMoE layers (another prefix below this one) are not ours to judge.
    unexpected = sorted(k for k in under_prefix if k[len(prefix) :] not in expected)
    if unexpected:
        raise OmniMoEInputError(f"{source.path}: unexpected keys under {prefix!r}: {', '.join(unexpected[:8])}")
    return _load_validated(source, expected, {k: prefix + k for k in expected})


def convert_upstream(
    src,
    out_dir,
    top_k: int,
    act: str = "silu",
    gate: str = "product",
    prefix: str | None = None,
    allow_pickle: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """Import upstream OmniMoE weights; returns the checkpoint directories written.

    out_dir follows the output policy of omnimoe.atomic: an existing non-empty directory only with
    `overwrite`, and then only the files written here are replaced.
    """
    source = open_weights(Path(src), allow_pickle=allow_pickle)
    prefixes = _select_prefixes(source.keys(), prefix)
    out_dir = Path(out_dir)
    multi = prefix is not None and "*" in prefix
    subdirs = [_layer_dir_name(p) + "/" for p in prefixes] if multi else [""]
    writes = [d + f for d in subdirs for f in (CONFIG_FILE, WEIGHTS_FILE)] + (["layers.json"] if multi else [])
    read = [source.path, *{s.path for s in getattr(source, "_source_of", {}).values()}]  # every shard too
    check_output(out_dir, directory=True, inputs=read, writes=writes, overwrite=overwrite, what="checkpoint")
    # Validate everything before writing anything.
    layers = []
    for p in prefixes:
        config = _infer_upstream_config(source, p, top_k, act, gate)
        layers.append((p, config, _layer_state_from_upstream(source, p, config)))
    with atomic_path(out_dir, overwrite=overwrite) as tmp:
        tmp.mkdir()
        written = []
        for p, config, state in layers:
            target = tmp / _layer_dir_name(p) if multi else tmp
            target.mkdir(exist_ok=True)
            (target / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            save_file({k: v.contiguous() for k, v in state.items()}, str(target / WEIGHTS_FILE), metadata={"format": "pt"})
            written.append(out_dir / target.relative_to(tmp))
        if multi:
            index = {"source": os.fspath(src), "prefix_pattern": prefix, "layers": {p: _layer_dir_name(p) for p, _, _ in layers}}
            (tmp / "layers.json").write_text(json.dumps(index, indent=2) + "\n")
    return written


def _layer_dir_name(prefix: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", prefix.rstrip("."))
    return name or "layer"


# ---------------------------------------------------------------------------------------------
# Directories and sharded safetensors (Hugging Face's model.safetensors.index.json)
# ---------------------------------------------------------------------------------------------
INDEX_FILE = WEIGHTS_FILE + ".index.json"


class _ShardedSource:
    """The tensors of `weight_map` {key: shard file} of an index, each shard memory-mapped; the
    same interface as _TensorSource, so a layer may span shards and a prefix matches across them."""

    def __init__(self, index: Path):
        self.path = index
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as e:
            raise OmniMoEInputError(f"{index}: not a readable safetensors index ({type(e).__name__})") from None
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise OmniMoEInputError(f"{index}: expected a JSON object with a non-empty \"weight_map\" of key -> shard file")
        shards: dict[str, _TensorSource] = {}
        self._source_of: dict[str, _TensorSource] = {}
        for key, shard in weight_map.items():
            if shard != Path(shard).name or shard in ("", ".", ".."):
                raise OmniMoEInputError(f"{index}: shard {shard!r} must be a file name next to the index")
            if shard not in shards:
                shards[shard] = _TensorSource(index.parent / shard)
            if key not in shards[shard]:
                raise OmniMoEInputError(f"{index}: maps {key!r} to {shard}, which does not hold it")
            self._source_of[key] = shards[shard]

    def keys(self) -> list[str]:
        return list(self._source_of)

    def __contains__(self, key: str) -> bool:
        return key in self._source_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self._source_of[key].shape(key)

    def get(self, key: str) -> torch.Tensor:
        return self._source_of[key].get(key)


def weight_files(path: Path, allow_pickle: bool = False) -> Path:
    """The weights a file or directory holds: the file itself, a directory's safetensors index,
    its `model.safetensors`, or its only .safetensors (with allow_pickle: .pt/.bin) file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise OmniMoEInputError(f"{path}: no such file or directory")
    for name in (INDEX_FILE, WEIGHTS_FILE):
        if (path / name).is_file():
            return path / name
    suffixes = (".safetensors",) + ((".pt", ".bin", ".pth") if allow_pickle else ())
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in suffixes)
    if len(found) == 1:
        return found[0]
    what = f"{len(found)} weight files and no {INDEX_FILE}" if found else f"no {WEIGHTS_FILE}, {INDEX_FILE} or other .safetensors file"
    raise OmniMoEInputError(f"{path}: {what}")


def open_weights(path: Path, allow_pickle: bool = False):
    """A lazy, memory-mapped tensor source for a weights file, a safetensors index or a directory."""
    path = weight_files(path, allow_pickle)
    if path.name.endswith(".index.json"):
        return _ShardedSource(path)
    return _TensorSource(path, allow_pickle=allow_pickle)
