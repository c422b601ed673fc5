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


def _compare_tokens(ref: dict, run: dict, output_name: str, tol: Tolerances, seq_len: int, causal: bool):
    """Per-token statuses and errors of one iteration, or an error string (shapes differ)."""
    a = np.asarray(ref[output_name], dtype=np.float64)
    b = np.asarray(run[output_name], dtype=np.float64)
    if a.shape != b.shape:
        return f"output {output_name!r} shape {list(b.shape)} != reference {list(a.shape)}"
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
    return {"status": status, "abs_err": abs_err, "rel_err": rel_err, "mode": mode, "layers": layers,
            "differs_real": differs_real, "tie_diff": tie_diff, "tie_seeds": tie_seeds, "seq_len": seq_len}


def compare_iterations(refs: list, runs: list, output_name: str, tol: Tolerances, seq_lens: list, causal: bool) -> dict:
    """Routing-aware comparison of one runner's outputs against the reference's, over every
    iteration (polygraphy's term: one input each); tokens of all iterations are counted together."""
    parts = []
    for i, (ref, run, seq_len) in enumerate(zip(refs, runs, seq_lens)):
        part = _compare_tokens(ref, run, output_name, tol, seq_len, causal)
        if isinstance(part, str):
            return {"pass": False, "error": part if len(refs) == 1 else f"iteration {i}: {part}"}
        parts.append(part)

    def cat(key):
        return np.concatenate([p[key] for p in parts]) if parts else np.zeros(0, bool)

    status, differs_real, tie_diff, tie_seeds = cat("status"), cat("differs_real"), cat("tie_diff"), cat("tie_seeds")
    T = status.size
    mode, layers = (parts[0]["mode"], parts[0]["layers"]) if parts else ("unavailable", 0)
    counts = {s: int((status == s).sum()) for s in STATUSES}
    # Which iteration and token within it each row is, for the worst-token list.
    where = [(i, t, p["seq_len"]) for i, p in enumerate(parts) for t in range(p["status"].size)]
    token_abs = np.concatenate([p["abs_err"].max(axis=1) if p["abs_err"].size else np.zeros(p["status"].size)
                                for p in parts]) if parts else np.zeros(0)
    worst = np.argsort(-np.nan_to_num(token_abs, nan=np.inf))[:5] if T else []

    def stats(key):
        values = np.concatenate([p[key].ravel() for p in parts]) if parts else np.zeros(0)
        finite = values[np.isfinite(values)]
        return (float(finite.max()), float(np.median(finite))) if finite.size else (0.0, 0.0)

    def worst_token(row):
        i, t, seq_len = where[row]
        p = parts[i]
        entry = {"token": t, "batch": t // seq_len, "position": t % seq_len,
                 "max_abs": float(p["abs_err"][t].max()), "max_rel": float(p["rel_err"][t].max()), "status": str(status[row])}
        return {"iteration": i, **entry} if len(parts) > 1 else entry

    max_abs, med_abs = stats("abs_err")
    max_rel, med_rel = stats("rel_err")
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
        "worst_tokens": [worst_token(int(row)) for row in worst],
    }


def compare_runs(ref: dict, run: dict, output_name: str, tol: Tolerances, seq_len: int, causal: bool) -> dict:
    """Routing-aware comparison of one runner's outputs against the reference's (one iteration)."""
    return compare_iterations([ref], [run], output_name, tol, [seq_len], causal)


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
    parser.add_argument("--atol", nargs="+", metavar="[OUTPUT:]ATOL",
                        help="absolute tolerance, as polygraphy spells it: for every output and/or per output, e.g. "
                        "'1e-5 logits:1e-4' (default per dtype: fp32 1e-5, fp16 1e-2, bf16 3e-2)")
    parser.add_argument("--rtol", nargs="+", metavar="[OUTPUT:]RTOL", help="relative tolerance, as --atol (default per dtype)")
    parser.add_argument("--tie-tol", type=float, help="score gap (log-prob units) under which routing choices are near-ties")
    parser.add_argument("--tokens", type=int, default=37, help="sequence length of the generated input (default 37)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the generated input (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated input (iteration i: seed + i)")
    parser.add_argument("--iterations", type=int, metavar="N",
                        help="compare on N generated inputs (default 1; with --input, what the file holds)")
    parser.add_argument("--input", metavar="X.npy|X.npz|X.json",
                        help="use this input instead of a generated one (.json: polygraphy's format, every iteration it holds)")
    parser.add_argument("--save-inputs", metavar="X.json|X.npy|X.npz",
                        help="write the inputs used (.json: polygraphy's format, for polygraphy run --load-inputs)")
    parser.add_argument("--report", metavar="R.json", help="write the parity report")
    parser.add_argument("--save-results", metavar="RESULTS.json",
                        help="write polygraphy RunResults (outputs + reference routing); with one runner, only record its run")
    parser.add_argument(
        "--load-results", metavar="RESULTS.json", action="append", default=[],
        help="add runs saved with --save-results (they come first, so a saved reference stays the reference)",
    )


def _save_results(runs, causal: bool, path, atomic_path, RunResults) -> None:
    """RunResults JSON; runs that carry the reference routing also say whether the model is causal
    (`routing.causal`), which deploy/polygraphy_compare.py needs to propagate near-ties."""
    from export.ort import ROUTING_PREFIX

    for _, iters in runs:
        for it in iters:
            if f"{ROUTING_PREFIX}0.log_probs_x" in it.keys():
                it[f"{ROUTING_PREFIX}causal"] = np.array(causal)
    with atomic_path(path) as p:
        RunResults(runs).save(str(p))


def run(args: argparse.Namespace) -> int:
    import contextlib

    from polygraphy.comparator import Comparator, RunResults
    from polygraphy.logger import G_LOGGER
    from rich.console import Console
    from rich.table import Table

    from deploy import runners as R
    from deploy.feeds import load_feeds, parse_tolerances, save_feeds, tolerance_for
    from export.ort import resolve_providers
    from omnimoe.atomic import atomic_path, check_output
    from omnimoe.errors import OmniMoEInputError

    console = Console(stderr=True)
    G_LOGGER.module_severity = G_LOGGER.ERROR  # our own table is the summary
    requested = R.parse_runner_names(args.runners)
    providers = resolve_providers(args.providers)
    if args.tie_tol is not None and not (np.isfinite(args.tie_tol) and args.tie_tol >= 0):
        raise OmniMoEInputError(f"--tie-tol must be a finite number >= 0, got {args.tie_tol}")
    atols, rtols = parse_tolerances("atol", args.atol), parse_tolerances("rtol", args.rtol)  # syntax; names below
    if args.iterations is not None and args.iterations < 1:
        raise OmniMoEInputError(f"--iterations must be >= 1, got {args.iterations}")
    for path in args.load_results:
        if not Path(path).is_file():
            raise OmniMoEInputError(f"{path}: no such results file")
    if args.save_inputs and Path(args.save_inputs).suffix not in (".json", ".npy", ".npz"):
        raise OmniMoEInputError(f"{args.save_inputs}: inputs are saved as .json (polygraphy), .npy or .npz")
    if args.save_inputs and (args.iterations or 1) > 1 and Path(args.save_inputs).suffix != ".json":
        raise OmniMoEInputError(f"{args.save_inputs}: {args.iterations} iterations need a .json file (polygraphy's input format)")
    inputs = [args.target, *args.onnx, args.engine, args.input, *args.load_results]
    for flag in ("save_inputs", "report", "save_results"):  # the output policy, before any work
        if getattr(args, flag):
            check_output(getattr(args, flag), inputs=inputs, what=f"--{flag.replace('_', '-')} file")

    with contextlib.ExitStack() as stack:
        setup = R.open_target(Path(args.target), [Path(p) for p in args.onnx])
        parse_tolerances("atol", args.atol, [setup.output_name])  # the names given are outputs compared here
        parse_tolerances("rtol", args.rtol, [setup.output_name])
        if args.input:
            feeds = [R.check_input(setup, x) for x in load_feeds(args.input, setup.input_name)]
            if args.iterations is not None and args.iterations != len(feeds):
                raise OmniMoEInputError(f"--iterations {args.iterations}: {args.input} holds {len(feeds)} iterations")
        else:
            feeds = [R.make_input(setup, None, args.tokens, args.batch, args.seed + i) for i in range(args.iterations or 1)]
        for feed in feeds:
            if feed.size == 0:
                raise OmniMoEInputError(f"nothing to compare: the input {setup.input_name} {list(feed.shape)} holds no tokens")
        runner_objs = R.build_runners(setup, requested, engine=args.engine, stack=stack, log=console.print,
                                      providers=providers)
        input_name, output_name, model_dtype = setup.input_name, setup.output_name, setup.dtype
        nonfinite = sum(R.count_nonfinite(feed) for feed in feeds)
        if nonfinite:
            console.print(f"[yellow]warning: the input holds {nonfinite} NaN/Inf values; they propagate to the outputs")
        if args.save_inputs:
            save_feeds(args.save_inputs, input_name, feeds)

        runs = []  # (runner name, [IterationResult]) in order; the first is the reference
        for path in args.load_results:
            try:
                loaded = list(RunResults.load(path).items())
            except Exception as e:  # polygraphy raises assorted errors on bad JSON
                raise OmniMoEInputError(f"{path}: not a polygraphy RunResults file ({type(e).__name__})") from None
            for name, iters in loaded:
                if len(iters) != len(feeds):
                    raise OmniMoEInputError(f"{path}: run {name!r} holds {len(iters)} iterations, the input {len(feeds)} "
                                            "(give the inputs it was made from with --input)")
            runs.extend(loaded)
        if len(runs) + len(runner_objs) < 2 and not args.save_results:  # say so before running anything
            raise OmniMoEInputError("nothing to compare: parity needs a run besides the reference (runners and/or --load-results)")
        if runner_objs:
            shapes = f"{list(feeds[0].shape)}" + (f" x {len(feeds)} iterations" if len(feeds) > 1 else "")
            console.print(f"running {', '.join(r.name for r in runner_objs)} on {input_name} {shapes} ...")
            runs.extend(Comparator.run(runner_objs, data_loader=[{input_name: feed} for feed in feeds]).items())
        causal = bool(np.issubdtype(feeds[0].dtype, np.integer))  # token-id models are causal LMs
        if len(runs) == 1 and args.save_results:  # only record a run (a reference for later)
            _save_results(runs, causal, args.save_results, atomic_path, RunResults)
            console.print(f"recorded {runs[0][0]} ({len(feeds)} iterations) in {args.save_results}; nothing compared")
            return 0
        if len(runs) < 2:
            raise OmniMoEInputError("nothing to compare: parity needs a run besides the reference (runners and/or --load-results)")

    atol, rtol, tie_tol = DEFAULT_TOLERANCES[model_dtype]
    tol = Tolerances(tolerance_for(atols, output_name, atol), tolerance_for(rtols, output_name, rtol),
                     args.tie_tol if args.tie_tol is not None else tie_tol)
    seq_lens = [feed.shape[1] if feed.ndim >= 2 else 1 for feed in feeds]
    (ref_name, ref_iters), *others = runs
    refs = [{k: np.asarray(v) for k, v in it.items()} for it in ref_iters]
    if output_name not in refs[0]:
        raise OmniMoEInputError(f"the reference run {ref_name!r} has no output {output_name!r}")
    report = {"reference": ref_name, "input": list(feeds[0].shape), "iterations": len(feeds), "nonfinite_inputs": nonfinite,
              "tolerances": dataclasses.asdict(tol), "runners": {}}
    for name, iters in others:
        run_outs = [{k: np.asarray(v) for k, v in it.items()} for it in iters]
        report["runners"][name] = compare_iterations(refs, run_outs, output_name, tol, seq_lens, causal)
    if not any(r.get("tokens") for r in report["runners"].values() if "error" not in r) and \
            all("error" not in r for r in report["runners"].values()):
        raise OmniMoEInputError("nothing to compare: the runs hold no tokens")
    report["pass"] = all(r["pass"] for r in report["runners"].values())

    if args.save_results:
        _save_results(runs, causal, args.save_results, atomic_path, RunResults)
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
