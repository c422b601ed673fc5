"""`omnimoe` command line: one entry point, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Bad input raises
OmniMoEInputError, which becomes one line on stderr and exit code 2 here, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from omnimoe.errors import OmniMoEInputError

# name -> (module, one-line help). Add a subcommand only once it works.
SUBCOMMANDS = {
    "convert": ("deploy.convert_cmd", "import an upstream OmniMoE state_dict into a checkpoint directory"),
    "export": ("deploy.export_cmd", "export a checkpoint to ONNX (omnimoe custom ops or standard-op twin)"),
    "build": ("deploy.build", "build a TensorRT engine from an ONNX plugin graph (TensorRT or TensorRT-RTX)"),
    "run": ("deploy.run_cmd", "run a checkpoint, ONNX model or engine on a .npy/.npz input"),
    "parity": ("deploy.parity", "routing-aware parity between PyTorch, ONNX Runtime and TensorRT runs (polygraphy)"),
    "bench": ("deploy.bench", "latency of every runner available on this machine"),
    "demo": ("deploy.demo", "train or load the tiny model and run the deployment pipeline end to end"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        sys.stderr.write(f"omnimoe: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omnimoe", description="Deploy OmniMoE layers: checkpoint -> ONNX -> TensorRT.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except OmniMoEInputError as e:
        sys.stderr.write(f"omnimoe {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("omnimoe: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
