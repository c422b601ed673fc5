"""omnimoe's routing-aware comparison for `polygraphy run --compare-func-script`.

    polygraphy run layer.std.onnx --onnxrt --load-inputs x.json --load-outputs reference.json \\
        --compare-func-script "$(python -m deploy.polygraphy_compare)"          # prints this file's path

`reference.json` is `omnimoe parity ... --save-results` output: besides the model output it holds
the reference routing (`routing.<layer>.log_probs_x|log_probs_y|indices`), which is what lets a
mismatch at a near-tie pass (see deploy/parity.py). Whichever of the two results carries the
routing log-probs is the reference; when neither does, outputs are compared element-wise with the
same tolerances and no excuse.

Tolerances: `compare_outputs` takes the defaults of `omnimoe parity` for the reference output's
dtype (float16 -> fp16, else fp32); `compare_fp32` / `compare_fp16` / `compare_bf16` force a set
(`--compare-func-script PATH:compare_bf16`); `make_compare_func(atol=..., rtol=..., tie_tol=...)`
builds one for a script of your own. polygraphy's --atol/--rtol do not reach a script function.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from deploy.parity import DEFAULT_TOLERANCES, Tolerances, compare_runs
from export.ort import ROUTING_PREFIX


def _is_reference(result) -> bool:
    return f"{ROUTING_PREFIX}0.log_probs_x" in result


def make_compare_func(atol: float | None = None, rtol: float | None = None, tie_tol: float | None = None, dtype: str | None = None):
    """A polygraphy compare function: (IterationResult, IterationResult) -> OrderedDict[output, bool]."""
    from polygraphy.logger import G_LOGGER

    def compare(result0, result1):
        ref, run = (result1, result0) if _is_reference(result1) and not _is_reference(result0) else (result0, result1)
        outputs = [name for name in ref.keys() if not name.startswith(ROUTING_PREFIX)]
        causal_key = f"{ROUTING_PREFIX}causal"  # written by omnimoe parity --save-results
        causal = bool(np.asarray(ref[causal_key])) if causal_key in ref else False
        verdicts = OrderedDict()
        for name in outputs:
            if name not in run:
                G_LOGGER.error(f"omnimoe: output {name} is missing from {run.runner_name or 'the other run'}")
                verdicts[name] = False
                continue
            out = np.asarray(ref[name])
            kind = dtype or ("fp16" if out.dtype == np.float16 else "fp32")
            defaults = DEFAULT_TOLERANCES[kind]
            tol = Tolerances(*(v if v is not None else d for v, d in zip((atol, rtol, tie_tol), defaults)))
            seq_len = max(out.shape[-2], 1) if out.ndim >= 2 else 1
            ref_out = {k: np.asarray(v) for k, v in ref.items() if k == name or k.startswith(ROUTING_PREFIX)}
            run_out = {k: np.asarray(v) for k, v in run.items() if k == name or k.startswith(ROUTING_PREFIX)}
            report = compare_runs(ref_out, run_out, name, tol, seq_len, causal)
            if "error" in report:
                G_LOGGER.error(f"omnimoe: {report['error']}")
            else:
                c, o = report["status_counts"], report["outputs"][name]
                log = G_LOGGER.info if report["pass"] else G_LOGGER.error
                log(f"omnimoe routing-aware | {name}: {report['tokens']} tokens, routing {report['routing']['mode']}: "
                    f"ok {c['ok']}, near-tie {c['near_tie']}, routing mismatch {c['routing_mismatch']}, "
                    f"output mismatch {c['output_mismatch']} | max abs {o['max_abs']:.3e} "
                    f"(atol {tol.atol:g}, rtol {tol.rtol:g}, tie {tol.tie_tol:g})")
            verdicts[name] = bool(report["pass"])
        return verdicts

    return compare


compare_outputs = make_compare_func()  # polygraphy's default function name for --compare-func-script
compare_fp32 = make_compare_func(dtype="fp32")
compare_fp16 = make_compare_func(dtype="fp16")
compare_bf16 = make_compare_func(dtype="bf16")


if __name__ == "__main__":  # `python -m deploy.polygraphy_compare` prints the path to give polygraphy
    print(__file__)
