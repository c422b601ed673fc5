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
    parser.add_argument("--input", required=True, metavar="X.npy|X.npz|X.json",
                        help="input array (.json: polygraphy's input format, every iteration it holds is run)")
    parser.add_argument("-o", "--output", required=True, metavar="Y.npy|Y.npz|Y.json",
                        help="output (.json: polygraphy's format, a list of {output name: array}, one per iteration)")
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
    from deploy.feeds import load_feeds
    from export.ort import resolve_providers
    from omnimoe.atomic import atomic_path, check_output

    target, out = Path(args.target), Path(args.output)
    if out.suffix not in (".npy", ".npz", ".json"):
        raise OmniMoEInputError(f"{out}: the output file must end in .npy, .npz or .json")
    check_output(out, inputs=[args.input, target])
    providers = resolve_providers(args.providers)
    with contextlib.ExitStack() as stack:
        if target.suffix in ENGINE_SUFFIXES:
            if not target.is_file():
                raise OmniMoEInputError(f"{target}: no such engine file")
            runner = stack.enter_context(R.trt_runner(target))
            (name, _), = runner.get_input_metadata().items()
            xs = load_feeds(args.input, name)
            for x in xs:
                _check_engine_profile(runner, target, name, x)
            output_name = None
        else:
            setup = R.open_target(target)
            names = ["torch-triton" if args.backend == "triton" else "torch"] if setup.model is not None else None
            (runner,) = R.build_runners(setup, names, stack=stack, providers=providers)
            name, output_name = setup.input_name, setup.output_name
            xs = [R.check_input(setup, x) for x in load_feeds(args.input, name)]
            stack.enter_context(runner)
        if len(xs) > 1 and out.suffix != ".json":
            raise OmniMoEInputError(f"{args.input} holds {len(xs)} iterations; write their outputs to a .json file")
        results = []
        for x in xs:
            _warn_nonfinite(x, "the input")
            # Keep the model's own output (the torch runner also reports routing); copy it out of the runner.
            results.append({k: np.array(v) for k, v in runner.infer({name: x}).items() if output_name is None or k == output_name})
    for outputs in results:
        for key, value in outputs.items():
            _warn_nonfinite(value, f"output {key}")
    with atomic_path(out) as tmp:
        if out.suffix == ".json":
            from polygraphy.json import save_json

            save_json(results, str(tmp), description="outputs")
        else:
            with open(tmp, "wb") as f:
                if out.suffix == ".npz":
                    np.savez(f, **results[0])
                else:
                    np.save(f, next(iter(results[0].values())))
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in results[0].items())
    print(f"wrote {out} ({shapes}" + (f" x {len(results)} iterations)" if len(results) > 1 else ")"))
    return 0
