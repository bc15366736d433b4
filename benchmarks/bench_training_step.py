"""Where one training step's time goes: data, clicks, the interaction forward and the backward, timed apart.

The step is the one `lib.training.loop.fit` runs with a training cache (scripts/build_training_cache.py): a batch
synthesised on the device (lib.training.synthesis), or made of synthetic shapes (lib.training.synthetic), then
K interaction steps (lib.training.interaction_loop) and the optimiser step. Each part runs `--repeats` times after
a warm-up and is timed with the device synchronised, so the figures add up to about a step:

    python benchmarks/bench_training_step.py --device cuda --training-cache data-cache/training_cache.npz
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "apps" / "mais"))

from lib.clicks.simulator import ClickConfig, sample_clicks  # noqa: E402
from lib.devices import resolve_device  # noqa: E402
from lib.model.weights import load_mais  # noqa: E402
from lib.training.interaction_loop import TRAINING_CLICK_MIXES, InteractionConfig, run_interaction  # noqa: E402
from lib.training.synthesis import Synthesiser, TrainingCache  # noqa: E402
from lib.training.synthetic import SyntheticConfig, synthetic_sample  # noqa: E402


def timed(device: torch.device, repeats: int, work: Callable[[], object]) -> float:
    """Seconds per call of `work`, after one warm-up call, the device synchronised around each."""
    work()
    total = 0.0
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        total += time.perf_counter() - started
    return total / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--training-cache", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "apps" / "mais" / "model" / "mais_light.pt")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = resolve_device(args.device)
    B = args.batch_size
    generator = torch.Generator(device=device).manual_seed(0)

    started = time.perf_counter()
    synthesiser = Synthesiser(TrainingCache.load(args.training_cache, device), generator=generator)
    print(f"training cache loaded in {time.perf_counter() - started:.1f} s")
    images, targets, _ = synthesiser.next_batch(B)
    figures = {
        f"synthesis from the cache, batch {B}": timed(device, args.repeats, lambda: synthesiser.next_batch(B)),
        f"synthetic shapes, {B} volumes": timed(
            device, args.repeats, lambda: [synthetic_sample(generator, SyntheticConfig()) for _ in range(B)]
        ),
    }
    rng = np.random.default_rng(0)
    predictions = torch.roll(targets, shifts=6, dims=2)  # a plausible error: the target shifted by 6 voxels
    for rule in ("random", "deepest"):
        config = ClickConfig(first_click=rule, next_click=rule)
        figures[f"one '{rule}' click, batch {B}"] = timed(
            device, args.repeats, lambda c=config: sample_clicks(targets, predictions, rng, c)
        )

    model = load_mais(args.weights, device=device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-5)
    interaction = InteractionConfig(num_clicks=args.clicks, clicks=TRAINING_CLICK_MIXES["mixed"], ce_weight=1.0)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward():
        with autocast:
            return run_interaction(model, model.embed_image(images), targets, rng, interaction).loss

    def step():
        loss = forward()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    figures[f"interaction forward, K = {args.clicks}, batch {B} (clicks included)"] = timed(
        device, args.repeats, forward
    )
    figures[f"forward + backward + AdamW, K = {args.clicks}, batch {B}"] = timed(device, args.repeats, step)
    for name, seconds in figures.items():
        print(f"{name:<62} {seconds * 1000:8.1f} ms")
    data_s = figures[f"synthesis from the cache, batch {B}"]
    step_s = figures[f"forward + backward + AdamW, K = {args.clicks}, batch {B}"]
    print(f"samples/s: {B / (data_s + step_s):.1f} (synthesis + step), {B / step_s:.1f} (step alone) on {device}")


if __name__ == "__main__":
    main()
