"""Training speed: samples/s with and without the embedding cache, and one fine-tuning epoch over the sample data.

The data are what the `mais` trainer builds from sample-data's final labels (every structure, 2 crops each); the
loop is lib.training.loop.fit exactly as the trainer runs it (encoder frozen, K clicks, batch 2 unless told).

    .venv/bin/python benchmarks/bench_training.py                 # CPU
    python benchmarks/bench_training.py --device cuda             # one GPU
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
from common import SAMPLE_DATA, model_benchmark_parser

from lib.configs.labels import SAMPLE_LABELS
from lib.training.config import FitConfig
from lib.training.loop import fit
from lib.training.real_data import labelled_images, structure_crops


def main() -> None:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    crops = []
    for image, label in labelled_images(SAMPLE_DATA):
        crops += structure_crops(image, label, SAMPLE_LABELS, np.random.default_rng(0), crops_per_structure=2)
    print(f"{len(crops)} training crops from sample-data in {time.perf_counter() - started:.1f} s")

    epoch_steps = math.ceil(len(crops) / args.batch_size)
    with tempfile.TemporaryDirectory() as out:
        base = FitConfig(
            out=Path(out) / "w.pt",
            init=args.weights,
            steps=2 * epoch_steps,
            batch_size=args.batch_size,
            clicks=args.clicks,
            synthetic_fraction=0.0,
            device=args.device,
            log_every=epoch_steps,
            checkpoint_every=10**9,
            deterministic=False,
        )
        rates = {}
        for cached in (False, True):
            epoch_ends = [time.perf_counter()]
            fit(
                base.replace(cache_embeddings=cached),
                crops,
                on_log=lambda _, ends=epoch_ends: ends.append(time.perf_counter()),
            )
            first, second = np.diff(epoch_ends)[:2]
            # epoch 2 is the steady state: with the cache on, every crop was embedded during epoch 1
            rates[cached] = epoch_steps * args.batch_size / second
            print(
                f"cache {'on ' if cached else 'off'}: epoch 1 {first:.1f} s, epoch 2 {second:.1f} s "
                f"({epoch_steps} steps of {args.batch_size}): {rates[cached]:.2f} samples/s"
            )
    print(f"speed-up from the cache: {rates[True] / rates[False]:.2f}x on {args.device}")


if __name__ == "__main__":
    main()
