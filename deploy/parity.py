"""Routing-aware parity: every runner against the first, token by token.

A product-key router turns tiny numeric differences into different expert choices when two
experts score within a hair of each other at the top-K boundary. So per token we compare the
expert index sets, not just the outputs:

- routing agrees and the output is within `atol + rtol * |ref|`            -> ok
- routing differs only by near-ties (every expert the runner picked instead
  scores within `tie_tol` of the reference's K-th score)                   -> near_tie (passes, counted)
- routing differs otherwise                                                 -> routing_mismatch (fails)
- routing agrees but the output is off                                      -> output_mismatch (fails)

A runner that does not report its routing (a standard-op graph, an engine) is judged by its
output; an output mismatch there passes as a near-tie only where the reference routing has a
near-tie at the boundary (gap between the K-th and (K+1)-th score under `tie_tol`). In a causal
LM a near-tie at position p may change every later position of that sequence, so it explains
mismatches at positions >= p.

Runs go through polygraphy's Comparator; `--save-results` writes its RunResults JSON (outputs plus
the reference routing), `--load-results` brings such a file back, e.g. to check a Jetson engine
against outputs saved on a workstation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

# (atol, rtol, tie_tol) per model dtype; tie_tol is in log-probability units.
DEFAULT_TOLERANCES = {"fp32": (1e-5, 1e-5, 1e-4), "fp16": (1e-2, 1e-2, 5e-2), "bf16": (3e-2, 3e-2, 1e-1)}
STATUSES = ("ok", "near_tie", "routing_mismatch", "output_mismatch")
_FAILING = {"routing_mismatch", "output_mismatch"}


@dataclasses.dataclass
class Tolerances:
    atol: float
    rtol: float
    tie_tol: float


def _routing_layers(outputs) -> int:
    n = 0
    while f"routing.{n}.indices" in outputs:
        n += 1
    return n


def _boundary_gap(px: np.ndarray, py: np.ndarray, top_k: int) -> np.ndarray:
    """Per token: K-th best score minus (K+1)-th best (inf when K = N)."""
    import torch

    from omnimoe.ops import product_key_topk_scores

    if top_k >= px.shape[1] ** 2:
        return np.full(px.shape[0], np.inf)
    scores, _ = product_key_topk_scores(torch.from_numpy(px), torch.from_numpy(py), top_k + 1)
    scores = scores.numpy()
    return scores[:, top_k - 1] - scores[:, top_k]


def _layer_routing_status(ref, run_indices, layer: int, tie_tol: float) -> tuple[np.ndarray, np.ndarray]:
    """(differs, near_tie) boolean [T] for one layer, comparing index sets (ops.routing_near_ties)."""
    import torch

    from omnimoe.ops import routing_near_ties

    px, py = ref[f"routing.{layer}.log_probs_x"], ref[f"routing.{layer}.log_probs_y"]
    ref_idx = ref[f"routing.{layer}.indices"]
    differs, near_tie = routing_near_ties(
        torch.from_numpy(px), torch.from_numpy(py), torch.from_numpy(ref_idx.astype(np.int64)),
        torch.from_numpy(run_indices.astype(np.int64)), tie_tol,
    )
    return differs.numpy(), near_tie.numpy()


def _propagate(seeds: np.ndarray, seq_len: int, causal: bool) -> np.ndarray:
    """Tokens a near-tie may influence: itself, and in a causal model every later position."""
    if not causal or seeds.size == 0:
        return seeds
    grid = seeds.reshape(-1, seq_len)
    return (np.cumsum(grid, axis=1) > 0).reshape(-1)


def compare_runs(ref: dict, run: dict, output_name: str, tol: Tolerances, seq_len: int, causal: bool) -> dict:
    """Routing-aware comparison of one runner's outputs against the reference's."""
    a = np.asarray(ref[output_name], dtype=np.float64)
    b = np.asarray(run[output_name], dtype=np.float64)
    if a.shape != b.shape:
        return {"pass": False, "error": f"output {output_name!r} shape {list(b.shape)} != reference {list(a.shape)}"}
    width = a.shape[-1] if a.ndim else 1
    a2, b2 = a.reshape(-1, width), b.reshape(-1, width)
    T = a2.shape[0]
    both_nan = np.isnan(a2) & np.isnan(b2)
    abs_err = np.where(both_nan, 0.0, np.abs(a2 - b2))
    rel_err = abs_err / np.maximum(np.abs(a2), 1e-30)
    with np.errstate(invalid="ignore"):
        within = (abs_err <= tol.atol + tol.rtol * np.abs(a2)) | both_nan | (a2 == b2)
    token_ok = within.all(axis=1) if T else np.zeros(0, bool)

    layers = _routing_layers(ref)
    run_layers = _routing_layers(run)
    differs_real = np.zeros(T, bool)
    tie_seeds = np.zeros(T, bool)
    tie_diff = np.zeros(T, bool)
    if layers == 0:
        mode = "unavailable"
    elif run_layers == layers:
        mode = "indices"
        for layer in range(layers):
            differs, near = _layer_routing_status(ref, run[f"routing.{layer}.indices"], layer, tol.tie_tol)
            tie_diff |= differs & near
            differs_real |= differs & ~near
        tie_seeds = tie_diff.copy()
    else:
        mode = "inferred-from-output"
        for layer in range(layers):
            k = ref[f"routing.{layer}.indices"].shape[1]
            gap = _boundary_gap(ref[f"routing.{layer}.log_probs_x"], ref[f"routing.{layer}.log_probs_y"], k)
            tie_seeds |= gap <= tol.tie_tol
    affected = _propagate(tie_seeds, seq_len, causal)

    status = np.full(T, "ok", dtype=object)
    status[~token_ok & ~affected] = "output_mismatch"
    status[~token_ok & affected] = "near_tie"
    status[tie_diff] = "near_tie"
    status[differs_real & ~affected] = "routing_mismatch"
    counts = {s: int((status == s).sum()) for s in STATUSES}

    worst = np.argsort(-np.nan_to_num(abs_err.max(axis=1), nan=np.inf))[:5] if T else []
    def stats(x):
        finite = x[np.isfinite(x)]
        return (float(finite.max()), float(np.median(finite))) if finite.size else (0.0, 0.0)

    max_abs, med_abs = stats(abs_err)
    max_rel, med_rel = stats(rel_err)
    return {
        "pass": not any(counts[s] for s in _FAILING),
        "tokens": T,
        "status_counts": counts,
        "outputs": {output_name: {"max_abs": max_abs, "median_abs": med_abs, "max_rel": max_rel, "median_rel": med_rel}},
        "routing": {
            "mode": mode,
            "layers": layers,
            "tokens_agreeing": int(T - differs_real.sum() - tie_diff.sum()) if mode == "indices" else None,
            "agreement": float(1 - (differs_real | tie_diff).mean()) if mode == "indices" and T else None,
            "near_tie_tokens": counts["near_tie"],
            "near_tie_boundary_tokens": int(tie_seeds.sum()),
        },
        "worst_tokens": [
            {
                "token": int(t),
                "batch": int(t // seq_len),
                "position": int(t % seq_len),
                "max_abs": float(abs_err[t].max()),
                "max_rel": float(rel_err[t].max()),
                "status": str(status[t]),
            }
            for t in worst
        ],
    }


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="CKPT_DIR|MODEL.onnx", help="a checkpoint directory or an exported ONNX model")
    parser.add_argument("--onnx", metavar="MODEL.onnx", action="append", default=[],
                        help="with a checkpoint: compare it against this ONNX model made from it (repeatable)")
    parser.add_argument("--engine", metavar="MODEL.engine", help="serialized TensorRT engine for the trt runner")
    parser.add_argument("--providers", metavar="cuda,tensorrt,cpu",
                        help="ONNX Runtime execution providers, in priority order (default cpu)")
    parser.add_argument(
        "--runners",
        help="comma-separated, first is the reference: torch, onnxrt (standard-op graph), onnxrt-plugin (custom-op graph), "
        "trt. Default: torch,onnxrt,onnxrt-plugin for a checkpoint; the ONNX model's graph for an ONNX file",
    )
    parser.add_argument("--atol", type=float, help="absolute tolerance (default per dtype: fp32 1e-5, fp16 1e-2, bf16 3e-2)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default per dtype, as --atol)")
    parser.add_argument("--tie-tol", type=float, help="score gap (log-prob units) under which routing choices are near-ties")
    parser.add_argument("--tokens", type=int, default=37, help="sequence length of the generated input (default 37)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the generated input (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--input", metavar="X.npy", help="use this input instead of a generated one")
    parser.add_argument("--save-inputs", metavar="X.npy", help="write the input used")
    parser.add_argument("--report", metavar="R.json", help="write the parity report")
    parser.add_argument("--save-results", metavar="RESULTS.json", help="write polygraphy RunResults (outputs + reference routing)")
    parser.add_argument(
        "--load-results", metavar="RESULTS.json", action="append", default=[],
        help="add runs saved with --save-results (they come first, so a saved reference stays the reference)",
    )


def run(args: argparse.Namespace) -> int:
    import contextlib

    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.logger import G_LOGGER
    from rich.console import Console
    from rich.table import Table

    from deploy import runners as R
    from export.ort import resolve_providers
    from omnimoe.atomic import atomic_path, check_output
    from omnimoe.errors import OmniMoEInputError

    console = Console(stderr=True)
    G_LOGGER.module_severity = G_LOGGER.ERROR  # our own table is the summary
    requested = R.parse_runner_names(args.runners)
    providers = resolve_providers(args.providers)
    for flag in ("atol", "rtol", "tie_tol"):
        value = getattr(args, flag)
        if value is not None and not (np.isfinite(value) and value >= 0):
            raise OmniMoEInputError(f"--{flag.replace('_', '-')} must be a finite number >= 0, got {value}")
    inputs = [args.target, *args.onnx, args.engine, args.input, *args.load_results]
    for flag in ("save_inputs", "report", "save_results"):  # the output policy, before any work
        if getattr(args, flag):
            check_output(getattr(args, flag), inputs=inputs, what=f"--{flag.replace('_', '-')} file")

    with contextlib.ExitStack() as stack:
        setup = R.open_target(Path(args.target), [Path(p) for p in args.onnx])
        feed = R.make_input(setup, args.input, args.tokens, args.batch, args.seed)
        if feed.size == 0:
            raise OmniMoEInputError(f"nothing to compare: the input {setup.input_name} {list(feed.shape)} holds no tokens")
        runner_objs = R.build_runners(setup, requested, engine=args.engine, stack=stack, log=console.print,
                                      providers=providers)
        input_name, output_name, model_dtype = setup.input_name, setup.output_name, setup.dtype
        nonfinite = R.count_nonfinite(feed)
        if nonfinite:
            console.print(f"[yellow]warning: the input holds {nonfinite} NaN/Inf values; they propagate to the outputs")
        if args.save_inputs:
            with atomic_path(args.save_inputs) as p:
                with open(p, "wb") as f:
                    np.save(f, feed)

        runs = []  # (runner name, [IterationResult]) in order; the first is the reference
        for path in args.load_results:
            if not Path(path).is_file():
                raise OmniMoEInputError(f"{path}: no such results file")
            try:
                runs.extend(RunResults.load(path).items())
            except Exception as e:  # polygraphy raises assorted errors on bad JSON
                raise OmniMoEInputError(f"{path}: not a polygraphy RunResults file ({type(e).__name__})") from None
        if runner_objs:
            console.print(f"running {', '.join(r.name for r in runner_objs)} on {input_name} {list(feed.shape)} ...")
            runs.extend(Comparator.run(runner_objs, data_loader=[{input_name: feed}]).items())
        if len(runs) < 2:
            raise OmniMoEInputError("nothing to compare: parity needs a run besides the reference (runners and/or --load-results)")

    atol, rtol, tie_tol = DEFAULT_TOLERANCES[model_dtype]
    tol = Tolerances(args.atol if args.atol is not None else atol, args.rtol if args.rtol is not None else rtol,
                     args.tie_tol if args.tie_tol is not None else tie_tol)
    seq_len = feed.shape[1] if feed.ndim >= 2 else 1
    causal = np.issubdtype(feed.dtype, np.integer)  # token-id models are causal LMs
    (ref_name, ref_iters), *others = runs
    ref = {k: np.asarray(v) for k, v in ref_iters[0].items()}
    if output_name not in ref:
        raise OmniMoEInputError(f"the reference run {ref_name!r} has no output {output_name!r}")
    report = {"reference": ref_name, "input": list(feed.shape), "nonfinite_inputs": nonfinite,
              "tolerances": dataclasses.asdict(tol), "runners": {}}
    for name, iters in others:
        run_out = {k: np.asarray(v) for k, v in iters[0].items()}
        report["runners"][name] = compare_runs(ref, run_out, output_name, tol, seq_len, causal)
    if not any(r.get("tokens") for r in report["runners"].values() if "error" not in r) and \
            all("error" not in r for r in report["runners"].values()):
        raise OmniMoEInputError("nothing to compare: the runs hold no tokens")
    report["pass"] = all(r["pass"] for r in report["runners"].values())

    if args.save_results:
        with atomic_path(args.save_results) as p:
            RunResults(runs).save(str(p))
    if args.report:
        with atomic_path(args.report) as p:
            p.write_text(json.dumps(report, indent=2) + "\n")

    table = Table(title=f"parity vs {ref_name} (atol {tol.atol:g}, rtol {tol.rtol:g}, tie {tol.tie_tol:g})")
    for col in ("runner", "max abs", "max rel", "routing", "agree", "near-tie", "mismatch", "result"):
        table.add_column(col)
    for name, r in report["runners"].items():
        if "error" in r:
            table.add_row(name, "-", "-", "-", "-", "-", "-", f"[red]FAIL: {r['error']}")
            continue
        o = r["outputs"][output_name]
        c = r["status_counts"]
        agree = "-" if r["routing"]["agreement"] is None else f"{100 * r['routing']['agreement']:.2f}%"
        table.add_row(name, f"{o['max_abs']:.2e}", f"{o['max_rel']:.2e}", r["routing"]["mode"], agree,
                      str(c["near_tie"]), str(c["routing_mismatch"] + c["output_mismatch"]),
                      "[green]PASS" if r["pass"] else "[red]FAIL")
    Console(width=120).print(table)
    for name, r in report["runners"].items():
        if not r["pass"] and "worst_tokens" in r:
            w = r["worst_tokens"][0]
            Console().print(f"{name}: worst token {w['token']} (batch {w['batch']}, position {w['position']}): "
                            f"max abs {w['max_abs']:.3e}, {w['status']}")
    return 0 if report["pass"] else 1
