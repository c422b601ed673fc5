"""`omnimoe serve-repo MODEL.engine -o REPO/`: a Triton Inference Server model repository.

    omnimoe serve-repo MODEL.engine -o REPO/ [--name NAME] [--max-batch-size N] [--overwrite]

writes

    REPO/NAME/config.pbtxt                  platform "tensorrt_plan", inputs/outputs from the engine
    REPO/NAME/1/model.plan                  a copy of the engine
    REPO/NAME/libomnimoe_trt_plugins.so     a copy of the native plugin library built beside it
    REPO/NAME/README.md                     the exact tritonserver command line

An engine cannot be opened without a GPU, so everything about it comes from the record `omnimoe
build` writes beside it (`MODEL.engine.json`): I/O names, TensorRT types and shapes, the
optimization profile, the plugin kind and library. The library sits inside the model directory,
not in a directory of its own, because Triton takes every directory of a repository for a model.

Dims: with max_batch_size 0 (the default) they are the engine's full shapes; an axis the profile
fixes (min = max, e.g. the batch axis omnimoe build pins to 1) gets that size, any other dynamic
axis -1. `--max-batch-size N` (Triton then owns the first axis) is accepted only when every input
and output has a dynamic first axis and the profile lets it range over 1..N.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from omnimoe.errors import OmniMoEInputError

# TensorRT DataType names (as the build record spells them) -> Triton model-config data types.
TRITON_TYPES = {
    "FLOAT": "TYPE_FP32",
    "HALF": "TYPE_FP16",
    "BF16": "TYPE_BF16",
    "INT32": "TYPE_INT32",
    "INT64": "TYPE_INT64",
    "INT8": "TYPE_INT8",
    "UINT8": "TYPE_UINT8",
    "BOOL": "TYPE_BOOL",
}
README_NAME = "README.md"
CONFIG_NAME = "config.pbtxt"
PLAN_PATH = "1/model.plan"
_NAME_OK = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine", metavar="MODEL.engine", help="an engine built by `omnimoe build --plugins native`")
    parser.add_argument("-o", "--output", required=True, metavar="REPO", help="model repository directory to write")
    parser.add_argument("--name", default=None, help="model name (default: the engine's file name without suffix)")
    parser.add_argument("--max-batch-size", type=int, default=0, metavar="N",
                        help="Triton max_batch_size (default 0: no Triton batching, dims are the engine's full "
                        "shapes); N > 0 needs a dynamic first axis whose profile covers 1..N")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing non-empty REPO (replaces only the files this command writes)")


# --------------------------------------------------------------------------------------------
# The build record
# --------------------------------------------------------------------------------------------
def read_record(engine: Path) -> dict:
    """The engine's build record, checked for what a model configuration needs."""
    from deploy.build import sidecar_path

    if not engine.is_file():
        raise OmniMoEInputError(f"{engine}: no such engine file")
    meta_path = sidecar_path(engine)
    if not meta_path.is_file():
        raise OmniMoEInputError(
            f"{engine}: no {meta_path.name} beside it; the engine was not built by `omnimoe build` (or its .json "
            "record is missing), and its inputs, outputs and profile cannot be read without a GPU"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise OmniMoEInputError(f"{meta_path}: not a readable omnimoe build record ({e})") from None
    if not isinstance(meta, dict):
        raise OmniMoEInputError(f"{meta_path}: not an omnimoe build record (a JSON object)")
    plugins = meta.get("plugins")
    if plugins == "python":
        raise OmniMoEInputError(
            f"{engine}: built with Python plugins, which Triton Inference Server cannot load; rebuild it with "
            f"`omnimoe build {meta.get('onnx') or 'MODEL.onnx'} -o {engine} --plugins native`"
        )
    if plugins != "native":
        raise OmniMoEInputError(f"{meta_path}: unknown plugin kind {plugins!r} (expected native)")
    library = meta.get("plugin_library")
    if not isinstance(library, str) or not library or Path(library).name != library:
        raise OmniMoEInputError(f"{meta_path}: no plugin library recorded for this native engine")
    if not (engine.parent / library).is_file():
        raise OmniMoEInputError(
            f"{engine}: its plugin library {library} is missing beside it; rebuild the engine with `omnimoe build`"
        )
    io = meta.get("io")
    if not isinstance(io, list) or not io:
        raise OmniMoEInputError(
            f"{meta_path}: no inputs/outputs recorded (written by an older omnimoe build); rebuild the engine"
        )
    for t in io:
        ok = (isinstance(t, dict) and isinstance(t.get("name"), str) and t["name"] and t.get("kind") in ("input", "output")
              and isinstance(t.get("shape"), list) and all(isinstance(d, int) and d >= -1 for d in t["shape"]))
        if not ok:
            raise OmniMoEInputError(f"{meta_path}: malformed io entry {t!r}")
        if t.get("dtype") not in TRITON_TYPES:
            raise OmniMoEInputError(
                f"{meta_path}: {t['kind']} {t['name']!r} has TensorRT type {t.get('dtype')!r}, which has no Triton "
                f"model-config type here (supported: {', '.join(TRITON_TYPES)})"
            )
    if not any(t["kind"] == "input" for t in io) or not any(t["kind"] == "output" for t in io):
        raise OmniMoEInputError(f"{meta_path}: the engine needs at least one input and one output")
    profiles = meta.get("profiles") or []
    if isinstance(profiles, dict):  # records written before several profiles were possible
        profiles = [profiles]
    if not isinstance(profiles, list) or not all(isinstance(p, dict) for p in profiles):
        raise OmniMoEInputError(f"{meta_path}: malformed profiles")
    for index, profile in enumerate(profiles):
        for t in io:
            if t["kind"] != "input" or t["name"] not in profile:
                if t["kind"] == "input" and -1 in t["shape"]:
                    raise OmniMoEInputError(f"{meta_path}: dynamic input {t['name']!r} has no range in profile {index}")
                continue
            bounds = profile[t["name"]]
            ok = (isinstance(bounds, list) and len(bounds) == 3
                  and all(isinstance(b, list) and len(b) == len(t["shape"]) and all(isinstance(d, int) for d in b)
                          for b in bounds))
            if not ok:
                raise OmniMoEInputError(f"{meta_path}: malformed profile {index} for input {t['name']!r}")
    meta["profiles"] = profiles
    return meta


# --------------------------------------------------------------------------------------------
# The model configuration
# --------------------------------------------------------------------------------------------
def _ranges(tensor: dict, profiles: list, axis: int) -> list[tuple[int, int]]:
    """(min, max) of one axis of an input in each profile."""
    return [(p[tensor["name"]][0][axis], p[tensor["name"]][2][axis]) for p in profiles if tensor["name"] in p]


def full_dims(tensor: dict, profiles: list) -> list[int]:
    """The tensor's full shape for Triton: the engine's sizes, and for a dynamic input axis the
    size every profile fixes it to (min = max, e.g. the batch axis omnimoe build pins to 1: Triton
    then refuses other sizes up front), else -1."""
    dims = list(tensor["shape"])
    if tensor["kind"] == "input":
        for i, d in enumerate(dims):
            sizes = {size for r in _ranges(tensor, profiles, i) for size in r}
            if d == -1 and len(sizes) == 1:
                dims[i] = sizes.pop()
    return dims


def _covers(ranges: list[tuple[int, int]], n: int) -> bool:
    """Do the (min, max) ranges together cover every size 1..n?"""
    reach = 0
    for lo, hi in sorted(ranges):
        if lo > reach + 1:
            break
        reach = max(reach, hi)
    return reach >= n


def check_max_batch_size(n: int, io: list, profiles: list) -> None:
    if n < 0:
        raise OmniMoEInputError(f"--max-batch-size {n}: must be >= 0")
    if n == 0:
        return
    for t in io:
        if not t["shape"] or t["shape"][0] != -1:
            raise OmniMoEInputError(
                f"--max-batch-size {n}: {t['kind']} {t['name']!r} has shape {t['shape']}, not a dynamic first "
                "(batch) axis; use --max-batch-size 0 (dims are then the full shapes)"
            )
        ranges = _ranges(t, profiles, 0) if t["kind"] == "input" else []
        if ranges and not _covers(ranges, n):
            spans = ", ".join(f"{lo}..{hi}" for lo, hi in ranges)
            raise OmniMoEInputError(
                f"--max-batch-size {n}: the engine's profiles let the first axis of {t['name']!r} range over {spans}, "
                f"and Triton sends batches of any size in 1..{n}; use --max-batch-size 0 (dims are then the full "
                "shapes) or build the engine with a batch range (omnimoe build --min-shapes/--max-shapes)"
            )


def _quote(text: str) -> str:
    """A protobuf text-format string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            out.extend(f"\\{b:03o}" for b in ch.encode())
    return '"' + "".join(out) + '"'


def model_config(name: str, meta: dict, max_batch_size: int) -> str:
    """config.pbtxt text (protobuf text format of Triton's inference.ModelConfig)."""
    profiles = meta["profiles"]
    lines = [
        f"# Written by omnimoe serve-repo from an engine built by {meta.get('backend')} {meta.get('backend_version')}",
        f"# ({meta.get('precision')}, native plugins for sm {','.join(map(str, meta.get('sms') or [])) or '?'}).",
    ]
    for index, profile in enumerate(profiles):
        for t in meta["io"]:
            if t["kind"] == "input" and t["name"] in profile:
                lo, opt, hi = profile[t["name"]]
                lines.append(f"# profile {index}, {t['name']}: min {lo}, opt {opt}, max {hi}")
    lines += [f"name: {_quote(name)}", 'platform: "tensorrt_plan"', f"max_batch_size: {max_batch_size}",
              'default_model_filename: "model.plan"']
    for kind in ("input", "output"):
        entries = []
        for t in (t for t in meta["io"] if t["kind"] == kind):
            dims = full_dims(t, profiles)
            if max_batch_size > 0:
                dims = dims[1:]
            entries.append(
                "  {\n"
                f"    name: {_quote(t['name'])}\n"
                f"    data_type: {TRITON_TYPES[t['dtype']]}\n"
                f"    dims: [ {', '.join(map(str, dims))} ]\n"
                "  }"
            )
        lines.append(f"{kind} [\n" + ",\n".join(entries) + "\n]")
    # Without `profile`, Triton uses only the engine's first optimization profile.
    use = f"\n    profile: [ {', '.join(_quote(str(i)) for i in range(len(profiles)))} ]" if len(profiles) > 1 else ""
    lines.append(f"instance_group [\n  {{\n    kind: KIND_GPU\n    count: 1{use}\n  }}\n]")
    return "\n".join(lines) + "\n"


def _shape_text(dims: list) -> str:
    return "[" + ", ".join("-1" if d == -1 else str(d) for d in dims) + "]"


def readme(name: str, engine: Path, repo: Path, library: str, meta: dict, max_batch_size: int) -> tuple[str, list]:
    """README.md text and the notes also printed on stderr."""
    lib_abs = repo / name / library
    profiles = meta["profiles"]
    notes = []
    backend, version = meta.get("backend"), meta.get("backend_version")
    if backend == "tensorrt-rtx":
        notes.append(
            f"this engine was built by TensorRT-RTX {version}; Triton's TensorRT backend deserializes only plans "
            f"built by its own TensorRT version: rebuild it with that TensorRT on the serving GPU (`omnimoe build "
            f"--backend tensorrt`, or trtexec with --dynamicPlugins) and replace {name}/{PLAN_PATH}"
        )
    rows = []
    for t in meta["io"]:
        dims = full_dims(t, profiles)
        rng = "; ".join(f"{_shape_text(p[t['name']][0])} .. {_shape_text(p[t['name']][2])}"
                        for p in profiles if t["kind"] == "input" and t["name"] in p)
        rows.append(f"| {t['kind']} | `{t['name']}` | {TRITON_TYPES[t['dtype']]} | {_shape_text(dims)} | {rng} |")
    text = f"""# {name}: a TensorRT plan with omnimoe native plugins

Written by `omnimoe serve-repo` from `{engine}` (built by {backend} {version}, {meta.get('precision')}; plugin
kernels for sm {','.join(map(str, meta.get('sms') or [])) or '?'}, other GPUs use the library's PTX fallback).

Serve it: the plugin library must be loaded by the server before the engine is deserialized.

```bash
tritonserver --model-repository={repo} --backend-config=tensorrt,plugins={lib_abs}
```

(not LD_PRELOAD: the library registers its plugins when it is loaded after TensorRT, as `plugins=` does).

Several libraries go in one `plugins=` value, separated by `;`. One server process can hold only one
omnimoe plugin library (the plugin names are the same in each): serve engines built into one
directory by `omnimoe build`, whose library carries the kernels of every engine there.

`max_batch_size: {max_batch_size}`{" (dims below are the full shapes; Triton does not batch requests)" if max_batch_size == 0 else ""}.

| kind | name | data_type | full shape | profile min .. max (per profile) |
|---|---|---|---|---|
""" + "\n".join(rows) + "\n"
    if notes:
        text += "\n" + "\n".join(f"**Note:** {n}." for n in notes) + "\n"
    text += ("\nNot verified by omnimoe: engine execution (and so serving) has not run on the project's machines; "
             "the model configuration is checked against Triton's `model_config.proto`.\n")
    return text, notes


# --------------------------------------------------------------------------------------------
def run(args) -> int:
    import sys

    from omnimoe.atomic import atomic_path, check_output

    engine = Path(args.engine)
    meta = read_record(engine)
    library = meta["plugin_library"]
    name = args.name if args.name is not None else re.sub(r"[^A-Za-z0-9_.-]", "_", engine.stem) or "model"
    if not _NAME_OK.match(name) or name in (".", ".."):
        raise OmniMoEInputError(f"--name {name!r}: a model name is letters, digits, '_', '.', '-' (not starting with . or -)")
    check_max_batch_size(args.max_batch_size, meta["io"], meta["profiles"])
    repo = Path(args.output)
    writes = [f"{name}/{CONFIG_NAME}", f"{name}/{PLAN_PATH}", f"{name}/{library}", f"{name}/{README_NAME}"]
    from deploy.build import sidecar_path

    check_output(repo, directory=True, writes=writes, overwrite=args.overwrite,
                 inputs=[engine, sidecar_path(engine), engine.parent / library], what="model repository")
    repo_abs = repo.resolve()
    config = model_config(name, meta, args.max_batch_size)
    readme_text, notes = readme(name, engine.resolve(), repo_abs, library, meta, args.max_batch_size)
    with atomic_path(repo, overwrite=args.overwrite) as tmp:
        model_dir = tmp / name
        (model_dir / "1").mkdir(parents=True)
        (model_dir / CONFIG_NAME).write_text(config)
        shutil.copyfile(engine, model_dir / PLAN_PATH)
        shutil.copyfile(engine.parent / library, model_dir / library)
        (model_dir / README_NAME).write_text(readme_text)
    for note in notes:
        sys.stderr.write(f"omnimoe serve-repo: note: {note}\n")
    sys.stdout.write(
        f"wrote {repo / name}/ ({CONFIG_NAME}, {PLAN_PATH}, {library}, {README_NAME})\n"
        f"serve it: tritonserver --model-repository={repo_abs} --backend-config=tensorrt,plugins={repo_abs / name / library}\n"
    )
    return 0
