"""`omnimoe convert`: import upstream flash-algo/omni-moe weights into a checkpoint directory."""
from __future__ import annotations

import argparse

from omnimoe.config import ACTIVATIONS, GATES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="upstream weights: .safetensors (or .pt/.bin with --allow-pickle), or a directory "
                        "holding model.safetensors or shards listed in model.safetensors.index.json")
    parser.add_argument("-o", "--output", required=True, help="checkpoint directory to write")
    parser.add_argument("--top-k", type=int, required=True, help="experts per token (not stored in upstream weights)")
    parser.add_argument("--act", default="silu", choices=ACTIVATIONS, help="hidden_act (not stored in upstream weights)")
    parser.add_argument("--gate", default="product", choices=GATES, help="product = upstream code, softmax = paper Eq. 2")
    parser.add_argument(
        "--prefix",
        help="key prefix of the layer, e.g. 'model.layers.3.mlp.'; with '*' (e.g. 'model.layers.*.mlp.') "
        "every matching layer is written to OUTPUT/<prefix>/ with an index OUTPUT/layers.json",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="allow .pt/.bin (loaded with weights_only=True)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into an existing non-empty OUTPUT, replacing only the files convert writes")


def run(args: argparse.Namespace) -> int:
    from omnimoe.checkpoint import convert_upstream

    written = convert_upstream(
        args.src, args.output, top_k=args.top_k, act=args.act, gate=args.gate, prefix=args.prefix, allow_pickle=args.allow_pickle,
        overwrite=args.overwrite,
    )
    for path in written:
        print(f"wrote {path}")
    return 0
