"""`omnimoe run MODEL.(onnx|engine)|CKPT_DIR --input X.npy -o Y.npy`: one forward pass.

Checkpoints run in PyTorch (reference or Triton backend), ONNX models in ONNX Runtime (standard or
plugin graph), engines in TensorRT where a runtime can execute them. `.npz` inputs are matched to
the model's input by name (or take the only array); `-o Y.npz` writes every output by name.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from omnimoe.errors import OmniMoEInputError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODEL.onnx|MODEL.engine|CKPT_DIR")
    parser.add_argument("--input", required=True, metavar="X.npy|X.npz", help="input array(s)")
    parser.add_argument("-o", "--output", required=True, metavar="Y.npy|Y.npz")
    parser.add_argument("--backend", choices=("reference", "triton"), default="reference", help="checkpoints only")
    parser.add_argument("--device", default=None, help="checkpoints only: torch device (default: cuda if available for triton, else cpu)")


def load_input(path, input_name: str) -> np.ndarray:
    path = Path(path)
    if not path.is_file():
        raise OmniMoEInputError(f"{path}: no such input file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise OmniMoEInputError(f"{path}: not a readable .npy/.npz file ({e})") from None
    if isinstance(data, np.lib.npyio.NpzFile):
        if input_name in data.files:
            return data[input_name]
        if len(data.files) == 1:
            return data[data.files[0]]
        raise OmniMoEInputError(f"{path}: holds {data.files}; expected an array named {input_name!r}")
    return data


def check_input(x: np.ndarray, name: str, integer: bool, rank: int, last_dim: int | None) -> None:
    """Shape/dtype checks shared by every target kind."""
    if x.ndim != rank:
        raise OmniMoEInputError(f"input {name} must have {rank} dimensions, got shape {list(x.shape)}")
    if last_dim is not None and x.shape[-1] != last_dim:
        raise OmniMoEInputError(f"input {name} must end in {last_dim}, got shape {list(x.shape)}")
    if integer and not np.issubdtype(x.dtype, np.integer):
        raise OmniMoEInputError(f"input {name} must hold integer token ids, got {x.dtype}")
    if not integer and not np.issubdtype(x.dtype, np.floating):
        raise OmniMoEInputError(f"input {name} must be floating point, got {x.dtype}")


def warn_nonfinite(x: np.ndarray, what: str) -> None:
    import sys

    if np.issubdtype(x.dtype, np.floating):
        bad = int((~np.isfinite(x)).sum())
        if bad:
            sys.stderr.write(f"omnimoe run: warning: {what} holds {bad} NaN/Inf values\n")


def _run_checkpoint(args, path: Path) -> dict[str, np.ndarray]:
    import torch

    from deploy.runners import model_io, to_numpy
    from omnimoe.checkpoint import load_checkpoint

    device = args.device or ("cuda" if args.backend == "triton" and torch.cuda.is_available() else "cpu")
    model = load_checkpoint(path, backend=args.backend, device=device)
    input_name, output_name = model_io(model)
    x = load_input(args.input, input_name)
    is_lm = output_name == "logits"
    check_input(x, input_name, integer=is_lm, rank=2 if is_lm else x.ndim if x.ndim in (2, 3) else 3,
                last_dim=None if is_lm else model.config.hidden_size)
    if is_lm:
        if x.size and (x.min() < 0 or x.max() >= model.config.vocab_size):
            raise OmniMoEInputError(f"token ids must lie in [0, {model.config.vocab_size})")
        if x.shape[1] > model.config.max_seq_len:
            raise OmniMoEInputError(f"sequence length {x.shape[1]} exceeds max_seq_len {model.config.max_seq_len}")
    warn_nonfinite(x, "the input")
    tensor = torch.from_numpy(np.ascontiguousarray(x)).to(device)
    if tensor.is_floating_point():
        tensor = tensor.to(model.up_embed.weight.dtype if not is_lm else tensor.dtype)
    else:
        tensor = tensor.long()
    with torch.no_grad():
        y = model(tensor)
    return {output_name: to_numpy(y)}


def _run_onnx(args, path: Path) -> dict[str, np.ndarray]:
    import onnx

    from export.ort import ort_session

    session = ort_session(path)
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise OmniMoEInputError(f"{path}: expected a model with one input, found {len(inputs)}")
    meta = inputs[0]
    x = load_input(args.input, meta.name)
    integer = "int" in meta.type
    last = meta.shape[-1] if isinstance(meta.shape[-1], int) else None
    check_input(x, meta.name, integer=integer, rank=len(meta.shape), last_dim=None if integer else last)
    warn_nonfinite(x, "the input")
    np_type = onnx.helper.tensor_dtype_to_np_dtype(
        {"tensor(float)": onnx.TensorProto.FLOAT, "tensor(float16)": onnx.TensorProto.FLOAT16,
         "tensor(int64)": onnx.TensorProto.INT64, "tensor(int32)": onnx.TensorProto.INT32}.get(meta.type, onnx.TensorProto.FLOAT)
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {meta.name: x.astype(np_type)})))


def _run_engine(args, path: Path) -> dict[str, np.ndarray]:
    from deploy.runners import trt_runner

    with trt_runner(path) as runner:
        meta = runner.get_input_metadata()
        (name, tensor_meta), = meta.items()
        x = load_input(args.input, name)
        check_input(x, name, integer=np.issubdtype(tensor_meta.dtype.numpy(), np.integer), rank=len(tensor_meta.shape), last_dim=None)
        engine = runner.engine
        lo, _, hi = engine.get_tensor_profile_shape(name, 0)
        for axis, (a, b) in enumerate(zip(lo, hi)):
            if not a <= x.shape[axis] <= b:
                raise OmniMoEInputError(
                    f"{path}: input {name} dimension {axis} is {x.shape[axis]}, outside the engine's profile [{a}, {b}]; rebuild with --tokens"
                )
        warn_nonfinite(x, "the input")
        return dict(runner.infer({name: x}))


def run(args: argparse.Namespace) -> int:
    from omnimoe.atomic import atomic_path

    target = Path(args.target)
    out = Path(args.output)
    if out.suffix not in (".npy", ".npz"):
        raise OmniMoEInputError(f"{out}: the output file must end in .npy or .npz")
    if target.is_dir():
        outputs = _run_checkpoint(args, target)
    elif not target.exists():
        raise OmniMoEInputError(f"{target}: no such model, engine or checkpoint")
    elif target.suffix == ".onnx":
        outputs = _run_onnx(args, target)
    elif target.suffix in (".engine", ".plan", ".trt"):
        outputs = _run_engine(args, target)
    else:
        raise OmniMoEInputError(f"{target}: expected a checkpoint directory, a .onnx model or a .engine file")
    for name, value in outputs.items():
        warn_nonfinite(value, f"output {name}")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            if out.suffix == ".npz":
                np.savez(f, **outputs)
            else:
                np.save(f, next(iter(outputs.values())))
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in outputs.items())
    print(f"wrote {out} ({shapes})")
    return 0
