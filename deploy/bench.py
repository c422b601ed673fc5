"""`omnimoe bench`: latency of every runner available on this machine, median after warm-up.

    omnimoe bench CKPT_DIR|MODEL.onnx [--onnx M.onnx ...] [--engine E] [--runners ...] [--tokens T] [--batch B]

Times one whole `infer` call per iteration, host-to-host (input copy, run, output copy), which
is what a caller of that runtime pays. For the layer kernels alone on a GPU, with the baselines
of SPEC §7, use scripts/bench_layer.py.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="CKPT_DIR|MODEL.onnx")
    parser.add_argument("--onnx", action="append", default=[], metavar="MODEL.onnx", help="ONNX model(s) made from the checkpoint")
    parser.add_argument("--engine", metavar="MODEL.engine", help="TensorRT engine for the trt runner")
    parser.add_argument("--runners", help="comma-separated (default: every runner available here)")
    parser.add_argument("--providers", metavar="cuda,tensorrt,cpu",
                        help="ONNX Runtime execution providers, in priority order (default cpu)")
    parser.add_argument("--tokens", type=int, default=128, help="sequence length (default 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", metavar="OUT.json", help="write the results")


def available_runners(setup, engine) -> list[str]:
    import torch

    names = []
    if setup.model is not None:
        names.append("torch")
        if torch.cuda.is_available():
            names.append("torch-triton")
    names += list(setup.onnx_files) or (["onnxrt", "onnxrt-plugin"] if setup.model is not None else [])
    if engine:
        names.append("trt")
    return names


def run(args: argparse.Namespace) -> int:
    import contextlib
    import platform

    from rich.console import Console
    from rich.table import Table

    from deploy import runners as R
    from export.ort import resolve_providers
    from omnimoe.atomic import atomic_path, check_output
    from omnimoe.errors import OmniMoEInputError

    if args.iters < 1 or args.warmup < 0:
        raise OmniMoEInputError("--iters must be >= 1 and --warmup >= 0")
    if args.tokens < 1 or args.batch < 1:
        raise OmniMoEInputError(f"nothing to time: --tokens {args.tokens} and --batch {args.batch} must be >= 1")
    if args.json:
        check_output(args.json, inputs=[args.target, *args.onnx, args.engine], what="--json file")
    console = Console(stderr=True)
    providers = resolve_providers(args.providers)
    results = []
    with contextlib.ExitStack() as stack:
        setup = R.open_target(Path(args.target), [Path(p) for p in args.onnx])
        names = R.parse_runner_names(args.runners) or available_runners(setup, args.engine)
        runners = R.build_runners(setup, names, engine=args.engine, stack=stack, log=console.print, report_routing=False,
                                  providers=providers)
        feed = {setup.input_name: R.make_input(setup, None, args.tokens, args.batch, seed=0)}
        tokens = args.tokens * args.batch
        for runner in runners:
            with runner:
                console.print(f"timing {runner.name} ...")
                for _ in range(args.warmup):
                    runner.infer(feed)
                times = []
                for _ in range(args.iters):
                    start = time.perf_counter()
                    runner.infer(feed)
                    times.append(time.perf_counter() - start)
            median = statistics.median(times)
            results.append({
                "runner": runner.name,
                "median_ms": 1e3 * median,
                "min_ms": 1e3 * min(times),
                "p90_ms": 1e3 * sorted(times)[int(0.9 * (len(times) - 1))],
                "tokens_per_s": tokens / median if median > 0 else None,
            })
    table = Table(title=f"{args.target}: batch {args.batch} x {args.tokens} tokens, median of {args.iters} after {args.warmup} warm-up")
    for col in ("runner", "median ms", "p90 ms", "tokens/s"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["runner"], f"{r['median_ms']:.3f}", f"{r['p90_ms']:.3f}", f"{r['tokens_per_s']:,.0f}")
    Console(width=120).print(table)
    if args.json:
        import torch

        doc = {"target": str(args.target), "providers": providers, "batch": args.batch, "tokens": args.tokens, "iters": args.iters,
               "warmup": args.warmup, "machine": platform.processor() or platform.machine(),
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "results": results}
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    return 0
