"""`omnimoe` command line: one entry point, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Bad input raises
OmniMoEInputError, which becomes one line on stderr and exit code 2 here, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import threading

from omnimoe import atomic
from omnimoe.errors import OmniMoEInputError

# name -> (module, one-line help). Add a subcommand only once it works.
SUBCOMMANDS = {
    "convert": ("deploy.convert_cmd", "import an upstream OmniMoE state_dict into a checkpoint directory"),
    "export": ("deploy.export_cmd", "export a checkpoint to ONNX (omnimoe custom ops or standard-op twin)"),
    "build": ("deploy.build", "build a TensorRT engine from an ONNX plugin graph (TensorRT or TensorRT-RTX)"),
    "run": ("deploy.run_cmd", "run a checkpoint, ONNX model or engine on a .npy/.npz input"),
    "parity": ("deploy.parity", "routing-aware parity between PyTorch, ONNX Runtime and TensorRT runs (polygraphy)"),
    "bench": ("deploy.bench", "latency of every runner available on this machine"),
    "inspect": ("deploy.inspect_cmd", "what a checkpoint, ONNX model or engine holds: config, I/O and dynamic axes, ops, precision, versions"),
    "serve-repo": ("deploy.serve_repo_cmd", "write a Triton Inference Server model repository for an engine built with native plugins"),
    "demo": ("deploy.demo", "train or load the tiny model and run the deployment pipeline end to end"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors: one line, exit 2
        sys.stderr.write(f"omnimoe: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="omnimoe", description="Deploy OmniMoE layers: checkpoint -> ONNX -> TensorRT.")
    parser.add_argument("-v", "--verbose", action="store_true", help="also show the libraries' own messages")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="also show the libraries' own messages (logging, warnings, polygraphy)")
        p.set_defaults(_module=module)
    return parser


@contextlib.contextmanager
def _library_chatter(verbose: bool):
    """Libraries' own messages (Python logging, warnings, polygraphy's logger) are kept off
    stderr, so a handled error is exactly one line there; -v/--verbose shows them."""
    import logging
    import warnings

    handler = logging.StreamHandler(sys.stderr) if verbose else logging.NullHandler()
    root = logging.getLogger()
    root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:  # the onnx extra is not installed
        G_LOGGER = None
    if G_LOGGER is not None:
        saved = G_LOGGER.colors, G_LOGGER.use_python_logging_system
        G_LOGGER.colors, G_LOGGER.use_python_logging_system = False, True
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        if G_LOGGER is not None:
            G_LOGGER.colors, G_LOGGER.use_python_logging_system = saved


def _one_line(message: str) -> str:
    return " ".join(str(message).split()) or "failed"


def _set_handlers(handler) -> dict:
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {s: signal.signal(s, handler) for s in atomic.HANDLED_SIGNALS}


def main(argv: list[str] | None = None) -> int:
    """Run one command. SIGINT, SIGTERM and SIGHUP clean up (temporary files removed) and exit
    with 128 + signal number. Called as the `omnimoe` program (argv None), a signal that arrives
    after the command is over (in exit hooks) ends the process at once with that code."""
    args = build_parser().parse_args(argv)
    atomic.reset_signal_state()
    previous = _set_handlers(atomic.on_signal)
    code = 1
    try:
        with _library_chatter(args.verbose):
            code = int(args._module.run(args) or 0)
    except OmniMoEInputError as e:
        sys.stderr.write(f"omnimoe {args.command}: error: {_one_line(e)}\n")
        code = 2
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        sys.stderr.write(f"omnimoe {args.command}: interrupted by {signal.Signals(signum).name}; temporary files removed\n")
        code = 128 + signum
    finally:
        if argv is None:
            _set_handlers(lambda signum, frame: atomic.flush_and_exit(128 + signum))
        else:
            for s, h in previous.items():
                signal.signal(s, h)
    return code


if __name__ == "__main__":
    sys.exit(main())
