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

    console.rule("[bold]summary")
    for name, path in artifacts.items():
        console.print(f"{name:>12}: {path}")
    console.print(f"done in {time.perf_counter() - started:.1f} s")
    return 0
