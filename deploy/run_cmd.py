"""`omnimoe run MODEL.(onnx|engine)|CKPT_DIR --input X.npy -o Y.npy`: one forward pass.

Checkpoints run in PyTorch (reference, or Triton kernels with `--backend triton` on a GPU), ONNX
models in ONNX Runtime (standard or plugin graph), engines in TensorRT where a runtime can execute
them. `.npz` inputs are matched to the model's input by name (or take the only array); `-o Y.npz`
writes the output under its name.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

from omnimoe.errors import OmniMoEInputError

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="MODEL.onnx|MODEL.engine|CKPT_DIR")
    parser.add_argument("--input", required=True, metavar="X.npy|X.npz", help="input array")
    parser.add_argument("-o", "--output", required=True, metavar="Y.npy|Y.npz")
    parser.add_argument("--backend", choices=("reference", "triton"), default="reference",
                        help="checkpoints only: triton runs the fused kernels on a CUDA GPU")
    parser.add_argument("--providers", metavar="cuda,tensorrt,cpu",
                        help="ONNX Runtime execution providers, in priority order for ONNX models (default cpu)")


def _warn_nonfinite(x: np.ndarray, what: str) -> None:
    from deploy.runners import count_nonfinite

    bad = count_nonfinite(x)
    if bad:
        sys.stderr.write(f"omnimoe run: warning: {what} holds {bad} NaN/Inf values\n")


def _check_engine_profile(runner, path: Path, name: str, x: np.ndarray) -> None:
    lo, _, hi = runner.engine.get_tensor_profile_shape(name, 0)
    for axis, (a, b) in enumerate(zip(lo, hi)):
        if not a <= x.shape[axis] <= b:
            raise OmniMoEInputError(
                f"{path}: input {name} dimension {axis} is {x.shape[axis]}, outside the engine's profile "
                f"[{a}, {b}]; rebuild it with omnimoe build --tokens"
            )


def run(args: argparse.Namespace) -> int:
    from deploy import runners as R
    from export.ort import resolve_providers
    from omnimoe.atomic import atomic_path, check_output

    target, out = Path(args.target), Path(args.output)
    if out.suffix not in (".npy", ".npz"):
        raise OmniMoEInputError(f"{out}: the output file must end in .npy or .npz")
    check_output(out, inputs=[args.input, target])
    providers = resolve_providers(args.providers)
    with contextlib.ExitStack() as stack:
        if target.suffix in ENGINE_SUFFIXES:
            if not target.is_file():
                raise OmniMoEInputError(f"{target}: no such engine file")
            runner = stack.enter_context(R.trt_runner(target))
            (name, _), = runner.get_input_metadata().items()
            x = R.load_array(args.input, name)
            _check_engine_profile(runner, target, name, x)
            output_name = None
        else:
            setup = R.open_target(target)
            names = ["torch-triton" if args.backend == "triton" else "torch"] if setup.model is not None else None
            (runner,) = R.build_runners(setup, names, stack=stack, providers=providers)
            name, output_name = setup.input_name, setup.output_name
            x = R.check_input(setup, R.load_array(args.input, name))
            stack.enter_context(runner)
        _warn_nonfinite(x, "the input")
        outputs = runner.infer({name: x})
    # Keep the model's own output (the torch runner also reports routing).
    outputs = {k: np.asarray(v) for k, v in outputs.items() if output_name is None or k == output_name}
    for key, value in outputs.items():
        _warn_nonfinite(value, f"output {key}")
    with atomic_path(out) as tmp:
        with open(tmp, "wb") as f:
            if out.suffix == ".npz":
                np.savez(f, **outputs)
            else:
                np.save(f, next(iter(outputs.values())))
    print(f"wrote {out} ({', '.join(f'{k} {list(v.shape)}' for k, v in outputs.items())})")
    return 0
