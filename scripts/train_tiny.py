"""Train TinyOmniLM on CPU (<= 60 s) and save a checkpoint that reloads bit-exactly.

    python scripts/train_tiny.py -o artifacts/tiny_lm [--steps 250]
"""
from __future__ import annotations

import argparse
import sys

import torch

from omnimoe.models import TinyOmniLM
from omnimoe.train import train_tiny


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", default="artifacts/tiny_lm", help="checkpoint directory")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = train_tiny(steps=args.steps, seed=args.seed)
    print(f"loss before {result.loss_before:.3f} -> after {result.loss_after:.3f} in {result.seconds:.1f} s")
    result.model.save_pretrained(args.output)
    reloaded = TinyOmniLM.from_pretrained(args.output)
    ids = result.model.encode("the cat sees ")[None]
    exact = torch.equal(result.model(ids), reloaded(ids))
    print(f"saved {args.output}; reloaded bit-exactly: {exact}")
    print("sample:", reloaded.generate("the cat ", 40).splitlines()[0])
    return 0 if exact and result.loss_after < 0.6 * result.loss_before else 1


if __name__ == "__main__":
    sys.exit(main())
