"""The tiny trained model: scripts/train_tiny.py trains on CPU within 60 s and saves a reloadable checkpoint."""
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from omnimoe.models import TinyOmniLM
from omnimoe.train import generate_corpus

ROOT = Path(__file__).resolve().parents[1]


def test_corpus_is_deterministic():
    assert generate_corpus(seed=0) == generate_corpus(seed=0)
    assert generate_corpus(seed=0) != generate_corpus(seed=1)


def test_train_script_drops_loss_and_reloads_bit_exactly(tmp_path):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_tiny.py"), "-o", str(tmp_path / "lm")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    before, after = map(float, re.search(r"loss before ([\d.]+) -> after ([\d.]+)", proc.stdout).groups())
    assert after < 0.5 * before
    assert "reloaded bit-exactly: True" in proc.stdout
    train_seconds = float(re.search(r"in ([\d.]+) s", proc.stdout).group(1))
    assert train_seconds <= 60, elapsed
    model = TinyOmniLM.from_pretrained(tmp_path / "lm")
    ids = model.encode("a dog likes ")[None]
    again = TinyOmniLM.from_pretrained(tmp_path / "lm")
    assert torch.equal(model(ids), again(ids))
