"""What the benchmarks share: the app's code on the import path, the repository's paths, the options every
benchmark of the model takes, and timing with the device synchronised."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "mais"
SHIPPED_WEIGHTS = APP_DIR / "model" / "mais_light.pt"
SAMPLE_DATA = REPO_ROOT / "sample-data"
sys.path.insert(0, str(APP_DIR))


def model_benchmark_parser(description: str, device: str = "cpu") -> argparse.ArgumentParser:
    """A parser with --device and --weights (default: the shipped weights); a benchmark adds its own options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=device)
    parser.add_argument("--weights", type=Path, default=SHIPPED_WEIGHTS)
    return parser


def timed(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of fn() in milliseconds, synchronising the GPU around each run."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
