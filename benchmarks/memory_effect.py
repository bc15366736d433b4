"""How much the memory changes a model's masks: the same weights with memory on and off, the same 10 clicks on 8
held-out synthetic volumes (seed 987654, as `lib.training.synthetic`'s evaluation cases). Prints, per weights file,
the memory output projection's mean |w| (it starts at zero), the share of the object's voxels that differ after
click 10, and Dice@10 with the memory on and off.

    .venv/bin/python benchmarks/memory_effect.py WEIGHTS [WEIGHTS ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "apps" / "mais"))

from lib.model.weights import load_mais  # noqa: E402
from lib.training.interaction_loop import InteractionConfig, run_interaction  # noqa: E402
from lib.training.synthetic import synthetic_sample  # noqa: E402
from lib.training.validation import VALIDATION_CLICKS  # noqa: E402

VOLUMES = 8
SEED = 987654


def memory_effect(path: Path) -> str:
    memory_on, memory_off = load_mais(path).eval(), load_mais(path, memory_mode="none").eval()
    config = InteractionConfig(num_clicks=10, clicks=VALIDATION_CLICKS)
    generator = torch.Generator().manual_seed(SEED)
    changed, dice_on, dice_off = [], [], []
    with torch.inference_mode():
        for _ in range(VOLUMES):
            image, mask = synthetic_sample(generator)
            embedding = memory_on.embed_image(image[None])
            on = run_interaction(memory_on, embedding, image[None], mask[None], np.random.default_rng(0), config)
            off = run_interaction(memory_off, embedding, image[None], mask[None], np.random.default_rng(0), config)
            changed.append((on.final_masks != off.final_masks).sum().item() / mask.sum().item())
            dice_on.append(on.dice_per_click[-1].item())
            dice_off.append(off.dice_per_click[-1].item())
    weight = memory_on.memory_attention.out_proj.weight
    return (
        f"{path}: out_proj mean |w| {weight.abs().mean():.4f}; voxels that differ after click 10 with the memory "
        f"off: {np.mean(changed):.1%} of the object; Dice@10 memory on {np.mean(dice_on):.3f}, "
        f"off {np.mean(dice_off):.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path, nargs="+")
    torch.set_num_threads(2)
    for path in parser.parse_args().weights:
        print(memory_effect(path))


if __name__ == "__main__":
    main()
