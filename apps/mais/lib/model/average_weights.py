"""The mean of several MAIS weights files of one network: a "weight soup" of checkpoints along one training line.

    cd apps/mais && python -m lib.model.average_weights mean.pt run22b.pt run23c.pt [--fp16]

Warm restarts of one run (benchmarks/results/generalist) end in nearby minima, and their mean is the cheap
ensemble stochastic weight averaging takes; it is how the weights of sessions 3-5 were made (runs 8 and 9), and
what sessions 6 and 12 measured against single checkpoints. Every file must describe the same network (config);
integer buffers are taken from the first file.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from lib.model.mais import Mais
from lib.model.weights import WeightsError, load_mais, read_mais_file, save_mais


def average_mais(paths: Sequence[str | os.PathLike]) -> Mais:
    """One model (on the CPU, eval mode) whose floating-point weights are the mean of the files' weights."""
    if len(paths) < 2:
        raise WeightsError(f"averaging needs at least 2 weights files, got {len(paths)}")
    models = [load_mais(path) for path in paths]
    for path, model in zip(paths[1:], models[1:]):
        if model.config != models[0].config:
            raise WeightsError(f"{path}: another network than {paths[0]} ({model.config} != {models[0].config})")
    states = [model.state_dict() for model in models]
    mean = {
        key: torch.stack([state[key].float() for state in states]).mean(0).to(value.dtype)
        if value.is_floating_point()
        else value
        for key, value in states[0].items()
    }
    models[0].load_state_dict(mean)
    return models[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="MAIS weights file to write")
    parser.add_argument("weights", type=Path, nargs="+", help="MAIS weights files of one network")
    parser.add_argument("--fp16", action="store_true", help="store the weights in float16 (as shipped)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        model = average_mais(args.weights)
    except WeightsError as error:
        parser.error(str(error))
    metadata = {**read_mais_file(args.weights[0]).get("metadata", {}), "averaged_from": [p.name for p in args.weights]}
    save_mais(model, args.out, metadata=metadata, storage_dtype=torch.float16 if args.fp16 else None)
    print(f"wrote {args.out}: the mean of {len(args.weights)} weights files")


if __name__ == "__main__":
    main()
