"""CPU cases of Triton kernels under TRITON_INTERPRET=1, all in ONE subprocess per test file (the
variable must be set before triton is imported, which the rest of the suite may already have
done). The test file re-runs itself with `--interpret`, runs its cases with `run_cases` and
`report`s; `interpret` is the parent side and returns {case: "ok" or the error}."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_PREFIX = "RESULTS "


def run_cases(cases: dict) -> dict:
    """{name: "ok" | "<error type>: <message>"} for each zero-argument case."""
    results = {}
    for name, fn in cases.items():
        try:
            fn()
            results[name] = "ok"
        except Exception as e:  # reported per case by the parent's parametrised tests
            results[name] = f"{type(e).__name__}: {e}"[:2000]
    return results


def report(results: dict) -> None:
    print(_PREFIX + json.dumps(results), flush=True)


def interpret(test_file, extra_args=(), extra_env=None) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(extra_env or {}))
    p = subprocess.run([sys.executable, str(Path(test_file).resolve()), "--interpret", *extra_args], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    lines = [l for l in p.stdout.splitlines() if l.startswith(_PREFIX)]
    assert p.returncode == 0 and lines, f"interpreter subprocess failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(lines[-1][len(_PREFIX):])
