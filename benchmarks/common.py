"""What the benchmarks share: the app's code on the import path, the repository's paths, the options every
benchmark of the model takes, timing with the device synchronised, and torch.profiler's tables."""

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


def profiler_activities() -> list:
    """What torch.profiler records here: the host's operators, and the GPU's kernels where there is one."""
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])


def print_profile(profiler, what: str, wall_s: float, rows: int) -> None:
    """The operators of a finished torch.profiler run by their own GPU time (host time without a GPU), one row
    per operator and input shapes, after the wall time and the time the GPU was busy: their difference is the
    time it waited for the host."""
    events = profiler.key_averages(group_by_input_shape=True)
    device_us = sum(getattr(e, "self_device_time_total", 0) for e in events)
    print(f"\nprofile of {what}: wall {wall_s * 1e3:.1f} ms, GPU busy {device_us / 1e3:.1f} ms")
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=rows))
