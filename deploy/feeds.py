"""Input files in the formats deployment tools share, and polygraphy's per-output tolerances.

- `.npy` (one array) and `.npz` (arrays by input name): one input.
- `.json`, or a directory of per-iteration `*.json` files: polygraphy's input format, a list of
  feed dicts {input name: array} saved with `polygraphy.json.save_json` (what `polygraphy run
  --save-inputs` writes and `--load-inputs` reads); one feed dict per iteration.

Reading and writing go through polygraphy's own functions (`StreamingDataLoader`, `save_json`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from omnimoe.errors import OmniMoEInputError

JSON_SUFFIX = ".json"


def is_json_feeds(path) -> bool:
    path = Path(path)
    return path.suffix == JSON_SUFFIX or path.is_dir()


def load_feeds(path, input_name: str) -> list[np.ndarray]:
    """The input `input_name` of every iteration in `path` (.npy/.npz: one iteration)."""
    from deploy.runners import load_array

    path = Path(path)
    if not is_json_feeds(path):
        return [load_array(path, input_name)]
    if not path.exists():
        raise OmniMoEInputError(f"{path}: no such input file")
    from polygraphy.comparator.data_loader import StreamingDataLoader
    from polygraphy.exception import PolygraphyException

    try:
        feeds = list(StreamingDataLoader([str(path)]))
    except (PolygraphyException, ValueError, OSError, TypeError, KeyError, RecursionError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise OmniMoEInputError(f"{path}: not polygraphy input data (a JSON list of {{name: array}}): {first}") from None
    if not feeds:
        raise OmniMoEInputError(f"{path}: holds no iterations")
    arrays = []
    for index, feed in enumerate(feeds):
        if not isinstance(feed, dict):
            raise OmniMoEInputError(f"{path}: iteration {index} is a {type(feed).__name__}, expected {{name: array}}")
        value = feed.get(input_name, next(iter(feed.values())) if len(feed) == 1 else None)
        if value is None:
            raise OmniMoEInputError(f"{path}: iteration {index} holds {sorted(feed)}; expected an input named {input_name!r}")
        if not isinstance(value, np.ndarray):
            raise OmniMoEInputError(f"{path}: iteration {index}: {input_name} is a {type(value).__name__}, expected an array")
        arrays.append(value)
    return arrays


def save_feeds(path, input_name: str, feeds: list[np.ndarray]) -> None:
    """Write the inputs atomically: .json for polygraphy (any number of iterations), .npy/.npz (one)."""
    from omnimoe.atomic import atomic_path

    path = Path(path)
    if path.suffix not in (JSON_SUFFIX, ".npy", ".npz"):
        raise OmniMoEInputError(f"{path}: inputs are saved as .json (polygraphy), .npy or .npz")
    if path.suffix != JSON_SUFFIX and len(feeds) != 1:
        raise OmniMoEInputError(f"{path}: {len(feeds)} iterations need a .json file (polygraphy's input format)")
    with atomic_path(path) as tmp:
        if path.suffix == JSON_SUFFIX:
            from polygraphy.json import save_json

            save_json([{input_name: x} for x in feeds], str(tmp), description="input data")
        else:
            with open(tmp, "wb") as f:
                if path.suffix == ".npz":
                    np.savez(f, **{input_name: feeds[0]})
                else:
                    np.save(f, feeds[0])


def parse_tolerances(flag: str, values, outputs: list[str] | None = None) -> dict[str, float]:
    """polygraphy's spelling: `--atol 1e-4`, `--atol logits:1e-4`, or both (`--atol 1e-5 logits:1e-4`).

    Returns {"": default (if given), output name: value}; names must be in `outputs` (if given).
    """
    from polygraphy.exception import PolygraphyException
    from polygraphy.tools.args import util as args_util

    if not values:
        return {}
    try:
        parsed = args_util.parse_arglist_to_dict(values, cast_to=float, allow_empty_key=True)
    except (PolygraphyException, ValueError) as e:
        raise OmniMoEInputError(f"--{flag}: expected [OUTPUT:]VALUE, e.g. 1e-5 or y:1e-4 ({e})") from None
    for name, value in parsed.items():
        if not isinstance(value, float) or not np.isfinite(value) or value < 0:
            raise OmniMoEInputError(f"--{flag} {name + ':' if name else ''}{value}: must be a finite number >= 0")
        if name and outputs is not None and name not in outputs:
            raise OmniMoEInputError(f"--{flag} {name}:{value}: no output {name!r} is compared (outputs: {', '.join(outputs)})")
    return parsed


def tolerance_for(parsed: dict[str, float], output: str, default: float) -> float:
    return parsed.get(output, parsed.get("", default))

