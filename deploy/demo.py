"""`omnimoe demo`: the whole pipeline on the embedded tiny model, end to end, with progress."""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="omnimoe-demo", help="where the demo writes its artifacts")
    parser.add_argument("--retrain", action="store_true", help="train the tiny model even if a checkpoint exists")


def run(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from omnimoe.checkpoint import load_checkpoint
    from omnimoe.train import train_tiny

    console = Console()
    workdir = Path(args.workdir)
    ckpt = workdir / "tiny_lm"
    started = time.perf_counter()
    artifacts: dict[str, Path] = {}

    console.rule("[bold]1. model")
    if ckpt.is_dir() and not args.retrain:
        model = load_checkpoint(ckpt)
        console.print(f"loaded trained TinyOmniLM from {ckpt}")
    else:
        console.print("training TinyOmniLM on the generated corpus (CPU, < 60 s)")
        result = train_tiny(log=console.print)
        model = result.model
        model.save_pretrained(ckpt)
    artifacts["checkpoint"] = ckpt
    n_params = sum(p.numel() for p in model.parameters())
    moe = model.config.moe
    console.print(
        f"{n_params / 1e6:.2f} M parameters, {model.config.num_layers} OmniMoE layers with N={moe.num_experts} experts, top-{moe.top_k}"
    )

    console.rule("[bold]2. run (PyTorch reference)")
    with torch.no_grad():
        sample = model.generate("the robot ", 40).splitlines()[0]
    console.print(f"greedy sample: [green]{sample!r}")

    from deploy.cli import main as omnimoe

    def step(title: str, argv: list) -> int:
        console.rule(f"[bold]{title}")
        console.print("$ omnimoe " + " ".join(str(a) for a in argv), style="dim")
        return omnimoe([str(a) for a in argv])

    plugin_onnx, standard_onnx = workdir / "tiny_lm.plugin.onnx", workdir / "tiny_lm.standard.onnx"
    if step("3. export: custom-op graph (TensorRT plugins / ORT custom ops)", ["export", ckpt, "-o", plugin_onnx]):
        return 1
    if step("4. export: standard-op twin (any runtime)", ["export", ckpt, "-o", standard_onnx, "--ops", "standard"]):
        return 1
    artifacts["plugin graph"], artifacts["standard graph"] = plugin_onnx, standard_onnx
    report = workdir / "parity.json"
    parity_code = step(
        "5. routing-aware parity: PyTorch vs ONNX Runtime (both graphs)",
        ["parity", ckpt, "--onnx", standard_onnx, "--onnx", plugin_onnx, "--tokens", 48, "--batch", 3, "--report", report],
    )
    artifacts["parity report"] = report
    engine = workdir / "tiny_lm.engine"
    try:
        import trt_plugins

        trt_plugins.load("auto")
        have_trt = True
    except Exception as e:  # no TensorRT flavour installed: say so, do not fail the demo
        console.print(f"[yellow]skipping the engine build: {e}")
        have_trt = False
    if have_trt:
        if step("6. TensorRT engine + native plugin library (C++ plugins, AOT Triton kernels; builds on CPU with TensorRT-RTX)",
                ["build", plugin_onnx, "-o", engine, "--tokens", "1:48:64", "--plugins", "native"]):
            return 1
        artifacts["engine"] = engine
        artifacts["plugin library"] = engine.with_name("libomnimoe_trt_plugins.so")
        console.print("engine execution needs a GPU TensorRT supports (not verified on our machines; see README)")

    console.rule("[bold]summary")
    console.print("parity: " + ("[green]PASS" if parity_code == 0 else "[red]FAIL"))
    for name, path in artifacts.items():
        console.print(f"{name:>14}: {path}")
    console.print(f"done in {time.perf_counter() - started:.1f} s")
    return parity_code
