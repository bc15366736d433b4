"""Training speed: samples/s with and without the embedding cache, and one fine-tuning epoch over the sample data;
or, with --training-cache, the generalist training's loop and the GPU's busy share.

The data are what the `mais` trainer builds from sample-data's final labels (every structure, 2 crops each); the
loop is lib.training.loop.fit exactly as the trainer runs it (encoder frozen, K clicks, batch 2 unless told).

    .venv/bin/python benchmarks/bench_training.py                 # CPU
    python benchmarks/bench_training.py --device cuda             # one GPU

With --training-cache (scripts/build_training_cache.py) it times lib.training.loop.fit with the options of
scripts/train_generalist.sh instead (the cache's label-map synthesis and real pairs for 90 % of each batch,
synthetic shapes for the rest, mixed click rules, the whole network trained, bf16 on a GPU), `--steps` steps
from the `--weights`, and prints the samples/s of the steps after the first `--warm-up-steps` (cuDNN's kernel
choice and the first allocations) and, where `nvidia-smi` is there, the mean share of time the GPU ran a kernel
(its `dmon` SM figure each second):

    python benchmarks/bench_training.py --device cuda --training-cache data-cache/training_cache.npz \
        --batch-size 128 --steps 40
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from common import SAMPLE_DATA, model_benchmark_parser

from lib.configs.labels import SAMPLE_LABELS
from lib.training.config import FitConfig
from lib.training.fit import parse_args
from lib.training.loop import fit
from lib.training.real_data import labelled_images, structure_crops


def main() -> None:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--training-cache", type=Path, help="time the generalist training's loop on this cache")
    parser.add_argument("--steps", type=int, default=40, help="with --training-cache: steps to run")
    parser.add_argument("--warm-up-steps", type=int, default=10, help="with --training-cache: steps not timed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.training_cache is not None:
        generalist_rate(args)
        return

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


def generalist_rate(args) -> None:
    """Samples/s and the GPU's busy share of the generalist training's loop (module docstring)."""
    if args.steps <= args.warm_up_steps:
        raise SystemExit(f"--steps {args.steps} must exceed --warm-up-steps {args.warm_up_steps}")
    with tempfile.TemporaryDirectory() as out:
        # scripts/train_generalist.sh's options (its HIGH_RES unset: the weights' own features)
        config, _ = parse_args(
            ["--init", str(args.weights), "--train-encoder", "--training-cache", str(args.training_cache)]
            + ["--cache-fraction", "0.9", "--click-mix", "mixed", "--clicks", str(args.clicks)]
            + ["--click-loss-weight", "1.0", "--high-res-lr-scale", "10", "--batch-size", str(args.batch_size)]
            + ["--lr", "1e-4", "--warmup-steps", "10", "--ce-weight", "1.0", "--steps", str(args.steps)]
            + ["--no-deterministic", "--log-every", "1", "--checkpoint-every", str(10**9), "--seed", "0"]
            + ["--device", args.device, "--out", str(Path(out) / "w.pt")]
        )
        step_ends: list[float] = []
        monitor = GpuMonitor() if args.device != "cpu" and shutil.which("nvidia-smi") else None
        try:
            fit(config, on_log=lambda _: step_ends.append(time.perf_counter()))
        finally:
            if monitor is not None:
                monitor.stop()
    timed_from, timed_to = step_ends[args.warm_up_steps - 1], step_ends[-1]
    rate = (len(step_ends) - args.warm_up_steps) * args.batch_size / (timed_to - timed_from)
    busy = monitor.busy_share(timed_from, timed_to) if monitor is not None else None
    busy_text = f", GPU busy {busy:.0%} of the time" if busy is not None else ""
    print(f"generalist loop, batch {args.batch_size}, K = {args.clicks}: {rate:.1f} samples/s over steps "
          f"{args.warm_up_steps + 1}-{len(step_ends)}{busy_text}")  # fmt: skip


class GpuMonitor:
    """`nvidia-smi dmon`'s SM share each second, each reading kept with the time it arrived."""

    def __init__(self) -> None:
        command = ["nvidia-smi", "dmon", "-s", "u", "-d", "1"]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.readings: list[tuple[float, float]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            fields = line.split()  # "gpu sm mem enc dec ...", header rows start with '#'
            if len(fields) > 1 and not line.startswith("#") and fields[1].isdigit():
                self.readings.append((time.perf_counter(), float(fields[1]) / 100))

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()
        self.reader.join()

    def busy_share(self, start: float, end: float) -> float | None:
        """The mean SM share of the readings that arrived between the perf_counter times start and end."""
        shares = [share for at, share in self.readings if start < at <= end]
        return sum(shares) / len(shares) if shares else None


if __name__ == "__main__":
    main()
