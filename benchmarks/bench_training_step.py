"""Where one training step's time goes: data, clicks, the interaction forward and the backward, timed apart.

The step is the one `lib.training.loop.fit` runs with a training cache (scripts/build_training_cache.py): a batch
synthesised on the device (lib.training.synthesis), or made of synthetic shapes (lib.training.synthetic), then
K interaction steps (lib.training.interaction_loop) and the optimiser step. Each part runs `--repeats` times after
a warm-up and is timed with the device synchronised (median), so the figures add up to about a step:

    python benchmarks/bench_training_step.py --device cuda --training-cache data-cache/training_cache.npz \
        --batch-size 96 160
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from common import model_benchmark_parser, timed

from lib.clicks.simulator import ClickConfig, sample_clicks
from lib.devices import resolve_device
from lib.model.mais import Mais
from lib.training.config import FitConfig
from lib.training.initial_model import build_model
from lib.training.interaction_loop import TRAINING_CLICK_MIXES, InteractionConfig, run_interaction
from lib.training.synthesis import Synthesiser, TrainingCache
from lib.training.synthetic import SyntheticConfig, synthetic_sample


def main() -> None:
    parser = model_benchmark_parser(__doc__, device="auto")
    parser.add_argument("--training-cache", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[24], help="one or more batch sizes to time")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--refinement",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time the network with the full-resolution refinement head (added fresh where the weights lack it, "
        "as training does)",
    )
    args = parser.parse_args()
    device = resolve_device(args.device)
    generator = torch.Generator(device=device).manual_seed(0)
    started = time.perf_counter()
    synthesiser = Synthesiser(TrainingCache.load(args.training_cache, device), generator=generator)
    print(f"training cache loaded in {time.perf_counter() - started:.1f} s")
    torch.backends.cudnn.benchmark = True  # as a --no-deterministic run
    model = build_model(FitConfig(init=args.weights, refinement=args.refinement, freeze_encoder=False), device)
    for batch_size in args.batch_size:
        time_step(model, synthesiser, generator, batch_size, args.clicks, args.repeats, device)


def time_step(
    model: Mais,
    synthesiser: Synthesiser,
    generator: torch.Generator,
    B: int,
    clicks: int,
    repeats: int,
    device: torch.device,
) -> None:
    """Print the parts of one training step at batch size B, the samples/s they add up to and the peak memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    images, targets, _ = synthesiser.next_batch(B)
    figures = {
        f"synthesis from the cache, batch {B}": timed(lambda: synthesiser.next_batch(B), device, repeats),
        f"synthetic shapes, {B} volumes": timed(
            lambda: [synthetic_sample(generator, SyntheticConfig()) for _ in range(B)], device, repeats
        ),
    }
    rng = np.random.default_rng(0)
    predictions = torch.roll(targets, shifts=6, dims=2)  # a plausible error: the target shifted by 6 voxels
    for rule in ("random", "deepest"):
        config = ClickConfig(first_click=rule, next_click=rule)
        figures[f"one '{rule}' click, batch {B}"] = timed(
            lambda c=config: sample_clicks(targets, predictions, rng, c), device, repeats
        )

    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-5)
    interaction = InteractionConfig(num_clicks=clicks, clicks=TRAINING_CLICK_MIXES["mixed"], ce_weight=1.0)
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


if __name__ == "__main__":
    main()
