"""Validation of a model under training: Dice after each simulated click on held-out crops.

The clicks follow the evaluation's deterministic rule (interior-most point of the largest error, no noise), so
two validations of the same weights give the same numbers and a change of Dice is the model's, not the clicks'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lib.clicks.simulator import CLICK_PRESETS
from lib.model.mais import Mais
from lib.training.interaction_loop import InteractionConfig, run_interaction
from lib.training.real_data import StructureCrop

VALIDATION_CLICKS = CLICK_PRESETS["center"]


@dataclass
class ValidationResult:
    """dice_per_click[k - 1]: mean hard Dice over the validation targets after click k (k = 1..K).
    per_target: {crop name: its K Dice values}; crops of one structure share a name and are averaged."""

    step: int
    dice_per_click: list[float]
    per_target: dict[str, list[float]] = field(default_factory=dict)

    @property
    def score(self) -> float:
        """Mean Dice over clicks 1..K, the area under the Dice-vs-clicks curve: the number the best weights
        are chosen by (a model must be good early and keep improving, not only at one click)."""
        return float(np.mean(self.dice_per_click))

    def dice_at(self, clicks: Sequence[int]) -> dict[int, float]:
        return {k: self.dice_per_click[k - 1] for k in clicks if k <= len(self.dice_per_click)}


def validate(
    model: Mais,
    crops: Sequence[StructureCrop],
    num_clicks: int,
    step: int,
    embed: Callable[[str, Tensor], Tensor] | None = None,
    seed: int = 0,
) -> ValidationResult:
    """Interact K times with every crop (batch of one, eval mode, no gradients) and average Dice per click.

    embed(key, volume [1, 1, S, S, S]) -> embedding: lets a trainer with a frozen encoder reuse cached embeddings;
    None runs the model's encoder. The model's train/eval modes are restored afterwards.
    """
    if not crops:
        raise ValueError("validation needs at least one crop")
    modes = {module: module.training for module in model.modules()}
    model.eval()
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    config = InteractionConfig(num_clicks=num_clicks, clicks=VALIDATION_CLICKS)
    curves: dict[str, list[Tensor]] = {}
    try:
        with torch.inference_mode():
            for index, crop in enumerate(crops):
                volume = crop.volume[None].to(device)
                embeddings = embed(f"validation:{index}", volume) if embed else model.embed_image(volume)
                result = run_interaction(model, embeddings.float(), volume, crop.mask[None].to(device), rng, config)
                curves.setdefault(crop.name, []).append(result.dice_per_click.cpu())
    finally:
        for module, training in modes.items():
            module.train(training)
    per_target = {name: torch.stack(c).mean(0).tolist() for name, c in curves.items()}
    mean = torch.tensor(list(per_target.values())).mean(0).tolist()
    return ValidationResult(step, mean, per_target)
