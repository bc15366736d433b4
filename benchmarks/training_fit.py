"""How well weights fit the generalist training's own samples, and what the decoder's 32^3 output could draw.

Samples are drawn as `scripts/train_generalist.sh` draws them from the training cache (lib.training.synthesis:
label maps with random intensities and geometry, single labels, unions of neighbours, connected parts, pseudo-
objects), then clicked with the validation's deterministic centre rule (lib.training.validation). Printed: mean
Dice after clicks 1 / 2 / 5 / 10 per target kind, for each weights file. Far below the held-out real structures'
figures would mean the model does not generalise; near them, that it does not fit.

With --oracle-every N, every N-th sample also gets the best mask a 32^3 logit grid can draw once upsampled as the
decoder's logits are: the logits themselves optimised against the target (Adam, from the logits of each cell's
coverage). Weights far below that are not limited by the output's resolution.

    .venv/bin/python benchmarks/training_fit.py --training-cache data-cache/training_cache.npz \\
        --weights apps/mais/model/mais_light.pt OTHER.pt --oracle-every 4
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import SHIPPED_WEIGHTS

from lib.devices import resolve_device
from lib.model.weights import load_mais
from lib.training.real_data import StructureCrop
from lib.training.synthesis import Synthesiser, TrainingCache
from lib.training.validation import validate

REPORTED_CLICKS = (1, 2, 5, 10)
KINDS = ("label", "union", "component", "pseudo-object")
DRAW_BATCH = 8
# the decoder's output grid is the crop's size / 4 (32^3 for 128^3)
DECODER_STRIDE = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--training-cache", type=Path, required=True)
    parser.add_argument("--weights", type=Path, nargs="+", default=[SHIPPED_WEIGHTS])
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--oracle-every", type=int, default=0, help="0: no oracle; N: every N-th sample")
    parser.add_argument("--oracle-steps", type=int, default=30)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    samples = draw_samples(args.training_cache, args.samples, args.seed, device)
    counts = {kind: sum(kind_of(s.name) == kind for s in samples) for kind in KINDS}
    print(f"{len(samples)} samples (seed {args.seed}): " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    after_last = {}
    for path in args.weights:
        model = load_mais(path, device=device)
        curves = validate(model, samples, args.clicks, step=0).per_target
        after_last[path] = {name: curve[-1] for name, curve in curves.items()}
        print(f"{path.name}: Dice after clicks {' / '.join(map(str, REPORTED_CLICKS))}")
        for kind in (*KINDS, None):
            chosen = [c for name, c in curves.items() if kind is None or kind_of(name) == kind]
            if chosen:
                mean = np.mean(chosen, axis=0)
                shown = " / ".join(f"{mean[k - 1]:.3f}" for k in REPORTED_CLICKS if k <= args.clicks)
                print(f"  {kind or 'all':14s} {len(chosen):3d}  {shown}")
    if args.oracle_every:
        subset = samples[:: args.oracle_every]
        best = [best_low_res_dice(s.mask.float()[None].to(device), args.oracle_steps) for s in subset]
        print(f"best 32^3 logits on {len(subset)} samples (every {args.oracle_every}th): Dice {np.mean(best):.3f}")
        for path, last in after_last.items():
            same = np.mean([last[s.name] for s in subset])
            print(f"  {path.name} after {args.clicks} clicks on the same samples: {same:.3f}")


def draw_samples(cache_path: Path, count: int, seed: int, device: torch.device) -> list[StructureCrop]:
    """`count` training samples as crops, each named `<source name>#<index>` (unique, with its target kind)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    synthesiser = Synthesiser(TrainingCache.load(cache_path, device), generator=generator)
    samples: list[StructureCrop] = []
    while len(samples) < count:
        images, targets, names = synthesiser.next_batch(DRAW_BATCH)
        for image, target, name in zip(images, targets, names):
            samples.append(StructureCrop(image.cpu(), target.cpu(), f"{name}#{len(samples)}"))
    return samples[:count]


def kind_of(name: str) -> str:
    """The target kind a sample's name states (lib.training.synthesis names every sample)."""
    return re.search("|".join(map(re.escape, KINDS)), name).group(0)


def best_low_res_dice(target: torch.Tensor, steps: int) -> float:
    """Dice of the best mask that logits on the decoder's grid draw once upsampled as the decoder's are (trilinear,
    threshold 0). target float [1, 1, S, S, S]."""
    coverage = F.avg_pool3d(target, DECODER_STRIDE)
    logits = torch.logit(coverage.clamp(1e-3, 1 - 1e-3)).requires_grad_(True)
    optimiser = torch.optim.Adam([logits], lr=1.0)

    def upsampled() -> torch.Tensor:
        return F.interpolate(logits, size=target.shape[-3:], mode="trilinear", align_corners=False)

    for _ in range(steps):
        sharp = upsampled() * 4  # a steeper sigmoid, so that the soft Dice is near the thresholded one
        probabilities = torch.sigmoid(sharp)
        soft_dice = 2 * (probabilities * target).sum() / (probabilities.sum() + target.sum())
        loss = 1 - soft_dice + F.binary_cross_entropy_with_logits(sharp, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        mask, truth = upsampled() > 0, target > 0
        return float(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))


if __name__ == "__main__":
    main()
