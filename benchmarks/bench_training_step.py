"""Where one training step's time goes: data, clicks, the interaction forward and the backward, timed apart.

The step is the one `lib.training.loop.fit` runs with a training cache (scripts/build_training_cache.py): a batch
synthesised on the device (lib.training.synthesis), or made of synthetic shapes (lib.training.synthetic), then
K interaction steps (lib.training.interaction_loop) and the optimiser step. Each part runs `--repeats` times after
a warm-up and is timed with the device synchronised (median), so the figures add up to about a step:

    python benchmarks/bench_training_step.py --device cuda --training-cache data-cache/training_cache.npz \
        --batch-size 96 160
    # as runs 16-23 train (no refinement head, the loss at the clicks), and where the last batch's step goes:
    python benchmarks/bench_training_step.py --device cuda --training-cache data-cache/training_cache.npz \
        --no-refinement --click-loss-weight 1.0 --batch-size 128 --profile 40

`--profile N` then runs `--repeats` whole steps (a synthesised batch, K clicks, backward, AdamW) at the last batch
size under torch.profiler and prints the N operators that take the most GPU time, after the steps' wall time and
the GPU's busy time: what a step waits for when the GPU idles (session 12: a third of the time at batch 128 and
192 alike, benchmarks/results/generalist/README.md).
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import model_benchmark_parser, print_profile, profiler_activities, timed

from lib.clicks.simulator import ClickConfig, sample_clicks
from lib.devices import resolve_device
from lib.model.mais import Mais
from lib.training.config import FitConfig
from lib.training.initial_model import build_model
from lib.training.interaction_loop import TRAINING_CLICK_MIXES, InteractionConfig, run_interaction
from lib.training.synthesis import Synthesiser, TrainingCache
from lib.training.synthetic import SyntheticConfig, synthetic_sample

# The two parts of a whole step, as the profile labels them.
STEP_PARTS = ("synthesis", "interaction, backward, AdamW")


def main() -> None:
    parser = model_benchmark_parser(__doc__, device="auto")
    parser.add_argument("--training-cache", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[24], help="one or more batch sizes to time")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--click-loss-weight", type=float, default=0.0, help="the cross-entropy at the clicks (runs 16-23: 1.0)"
    )
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile whole steps: N operators")
    parser.add_argument(
        "--trace",
        type=Path,
        help="with --profile: also write the steps' timeline here (Chrome's trace format, gzip-compressed when the "
        "name ends in .gz), to find what the GPU waits for between its kernels",
    )
    parser.add_argument(
        "--refinement",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the network with the full-resolution refinement head (added fresh where the weights lack it, "
        "as training does)",
    )
    parser.add_argument(
        "--high-res-context",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with (or without) the residual block on the decoder's 32^3 features (added fresh where the weights "
        "lack it, as training does); unset: the weights' own",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    started = time.perf_counter()
    synthesiser = Synthesiser(TrainingCache.load(args.training_cache, device), generator=generator)
    print(f"training cache loaded in {time.perf_counter() - started:.1f} s")
    torch.backends.cudnn.benchmark = True  # as a --no-deterministic run
    config = FitConfig(
        init=args.weights, refinement=args.refinement, high_res_context=args.high_res_context, freeze_encoder=False
    )
    model = build_model(config, device)
    for batch_size in args.batch_size:
        step = time_step(
            model, synthesiser, generator, batch_size, args.clicks, args.click_loss_weight, args.repeats, device
        )
    if args.profile:
        profile_steps(step, args.repeats, device, args.profile, args.trace)


def time_step(
    model: Mais,
    synthesiser: Synthesiser,
    generator: torch.Generator,
    B: int,
    clicks: int,
    click_weight: float,
    repeats: int,
    device: torch.device,
) -> Callable[[], None]:
    """Print the parts of one training step at batch size B, the samples/s they add up to and the peak memory;
    return the whole step (a fresh synthesised batch, then the interaction, backward and AdamW)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images, targets, _ = synthesiser.next_batch(B)
    host = torch.Generator().manual_seed(0)  # the shapes' scalars, as lib.training.data_sources draws them

    def shapes():
        return [synthetic_sample(generator, SyntheticConfig(), host) for _ in range(B)]

    if device.type == "cuda":
        print(
            f"synthesis, batch {B}: {synchronisations(lambda: synthesiser.next_batch(B))} host-device "
            f"synchronisations; synthetic shapes, {B} volumes: {synchronisations(shapes)}"
        )
    figures = {
        f"synthesis from the cache, batch {B}": timed(lambda: synthesiser.next_batch(B), device, repeats),
        f"synthetic shapes, {B} volumes": timed(shapes, device, repeats),
    }
    rng = np.random.default_rng(0)
    predictions = torch.roll(targets, shifts=6, dims=2)  # a plausible error: the target shifted by 6 voxels
    for rule in ("random", "deepest"):
        config = ClickConfig(first_click=rule, next_click=rule)
        figures[f"one '{rule}' click, batch {B}"] = timed(
            lambda c=config: sample_clicks(targets, predictions, rng, c), device, repeats
        )

    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-5)
    interaction = InteractionConfig(
        num_clicks=clicks, clicks=TRAINING_CLICK_MIXES["mixed"], ce_weight=1.0, click_weight=click_weight
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward():
        with autocast:
            return run_interaction(model, model.embed_image(images), images, targets, rng, interaction).loss

    def step():
        loss = forward()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    figures[f"interaction forward, K = {clicks}, batch {B} (clicks included)"] = timed(forward, device, repeats)
    figures[f"forward + backward + AdamW, K = {clicks}, batch {B}"] = timed(step, device, repeats)
    for name, milliseconds in figures.items():
        print(f"{name:<62} {milliseconds:8.1f} ms")
    data_ms = figures[f"synthesis from the cache, batch {B}"]
    step_ms = figures[f"forward + backward + AdamW, K = {clicks}, batch {B}"]
    peak = f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(
        f"batch {B}: samples/s {B * 1e3 / (data_ms + step_ms):.1f} (synthesis + step), {B * 1e3 / step_ms:.1f} "
        f"(step alone){peak}",
        flush=True,
    )

    def whole_step():
        nonlocal images, targets  # what forward() trains on
        with torch.profiler.record_function(STEP_PARTS[0]):
            images, targets, _ = synthesiser.next_batch(B)
        with torch.profiler.record_function(STEP_PARTS[1]):
            step()

    return whole_step


def synchronisations(fn: Callable[[], object]) -> int:
    """How many times fn() made the host wait for the GPU (CUDA's synchronisation debug mode warns at each)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_steps(
    step: Callable[[], None], repeats: int, device: torch.device, rows: int, trace: Path | None = None
) -> None:
    """`repeats` whole steps under torch.profiler, after one unprofiled warm-up step; their timeline to `trace`."""
    from torch.profiler import profile

    step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    with profile(activities=profiler_activities()) as profiler:
        started = time.perf_counter()
        for _ in range(repeats):
            step()
        sync()
        wall_s = time.perf_counter() - started
    print_profile(profiler, f"{repeats} training steps", wall_s, rows)
    for part in profiler.key_averages():
        if part.key in STEP_PARTS:  # host time includes waiting for the GPU where the host synchronises
            host_ms, device_ms = part.cpu_time_total / 1e3, part.device_time_total / 1e3
            print(f"{part.key:<30} host {host_ms:9.1f} ms, GPU {device_ms:9.1f} ms")
    if trace is not None:
        profiler.export_chrome_trace(str(trace))  # the profiler gzips a name ending in .gz
        print(f"timeline written to {trace}")


if __name__ == "__main__":
    main()
