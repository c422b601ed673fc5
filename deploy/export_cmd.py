"""`omnimoe export CKPT_DIR -o MODEL.onnx [--ops plugin|standard] [--dtype fp32|fp16|bf16] [--opset N]`.

Layer checkpoints export as `x [batch, seq, d] -> y [batch, seq, d]`; TinyOmniLM checkpoints as
`input_ids [batch, seq] int64 -> logits [batch, seq, vocab]`; batch and seq are dynamic.
"""
from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT_DIR", help="checkpoint directory (config.json + model.safetensors)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.onnx", help="ONNX file to write")
    parser.add_argument(
        "--ops",
        choices=("plugin", "standard"),
        default="plugin",
        help="plugin: the two omnimoe custom ops (TensorRT plugins / ORT custom ops); standard: standard ONNX ops only",
    )
    parser.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16"), default="fp32", help="weight and activation dtype of the graph"
    )
    parser.add_argument("--opset", type=int, default=None, metavar="N", help="default-domain opset (18-23; default: exporter's)")
    parser.add_argument(
        "--external-data",
        choices=("auto", "always", "never"),
        default="auto",
        help="weights in MODEL.onnx.data (auto: when over 1 GiB)",
    )


def example_inputs_for(model):
    """(example inputs, input names, output names, dynamic axes) for a loaded checkpoint."""
    import torch

    from omnimoe.errors import OmniMoEInputError
    from omnimoe.layer import OmniMoELayer
    from omnimoe.models import TinyOmniLM

    if isinstance(model, OmniMoELayer):
        # batch 2, seq 3: sizes other than 0/1 so that torch.export keeps both axes symbolic.
        x = torch.zeros(2, 3, model.config.hidden_size)
        return (x,), ["x"], ["y"], ({0: "batch", 1: "seq"},)
    if isinstance(model, TinyOmniLM):
        seq = min(3, model.config.max_seq_len)
        ids = torch.zeros(2, seq, dtype=torch.long)
        return (ids,), ["input_ids"], ["logits"], ({0: "batch", 1: "seq"},)
    raise OmniMoEInputError(f"cannot export a {type(model).__name__} checkpoint")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from export.onnx_export import check_external_data_choice, check_opset, export_onnx, prepare_output
    from omnimoe.checkpoint import load_checkpoint

    console = Console(stderr=True)
    check_opset(args.opset)
    output = prepare_output(args.output)  # the output policy, before any work
    model = load_checkpoint(args.checkpoint)
    inputs, input_names, output_names, dynamic = example_inputs_for(model)
    external = {"auto": None, "always": True, "never": False}[args.external_data]
    check_external_data_choice(model, args.dtype, external)
    console.print(f"exporting {args.checkpoint} ({type(model).__name__}) with {args.ops} ops, {args.dtype} ...")
    result = export_onnx(
        model,
        output,
        example_inputs=inputs,
        ops=args.ops,
        dtype=args.dtype,
        opset=args.opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic,
        external_data=external,
        progress=True,
    )
    written = f"{result.path}" + (f" + {result.data_path.name}" if result.data_path else "")
    console.print(
        f"wrote {written} (opset {result.opset}, {result.initializer_bytes / 2**20:.1f} MiB of weights; "
        f"trace {result.trace_seconds:.1f} s, write {result.write_seconds:.1f} s, check {result.check_seconds:.1f} s)",
        soft_wrap=True,
    )
    return 0
