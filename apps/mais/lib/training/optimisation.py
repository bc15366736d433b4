"""The optimiser, its learning-rate schedule and one optimiser step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lib.model.mais import Mais
from lib.training.config import FitConfig


def make_optimiser(model: Mais, config: FitConfig) -> tuple[torch.optim.Optimizer, LearningRateSchedule]:
    """AdamW over the trainable parameters, and the schedule that sets their learning rates every step.

    The parts whose output layer starts at zero are groups of their own, each at its own scale of lr: the memory
    attention at `memory_lr_scale` (at the rest's learning rate it stayed near zero: after 215 steps at 2e-4 its
    weights averaged |w| 0.0008, and the memory changed no Dice: benchmarks/results/memory_comparison/README.md)
    and the high-resolution image features at `high_res_lr_scale` (after 21 minutes at 1e-4 from zero their
    projections averaged |w| 0.004, and the held-out Dice had not moved: benchmarks/results/generalist/README.md).
    AdamW moves a weight by about the learning rate a step, whatever its gradient's size, so a part that starts at
    zero needs a larger one to matter within a run."""
    # one group a part whatever the scales, so that a run resumed with other scales finds the groups it saved
    # (and keeps its own scales: lib.training.checkpoint.load_checkpoint)
    parts = {"memory_attention": config.memory_lr_scale, "high_res": config.high_res_lr_scale}
    part_of = {}
    for part in parts:
        module = getattr(model, part)  # None: a model without high-resolution features
        if module is not None:
            part_of.update({id(p): part for p in module.parameters()})
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in part_of], "lr_scale": 1.0}] + [
        {"params": [p for p in trainable if part_of.get(id(p)) == part], "lr_scale": scale}
        for part, scale in parts.items()
    ]
    optimiser = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, max(1, config.steps // 10))
    return optimiser, LearningRateSchedule(optimiser, config.lr, warmup, config.steps, config.time_budget_s)


@dataclass
class LearningRateSchedule:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of `peak_lr` at progress 1.

    Progress is the larger of step / steps and, with a time budget, the share of the budget used: a run that the
    device's clock stops still ends its decay instead of stopping at a high learning rate, whatever its speed.
    The budget counts per call, so a resumed run decays over the rest of its steps or its new budget.
    """

    optimiser: torch.optim.Optimizer
    peak_lr: float
    warmup: int
    steps: int
    time_budget_s: float | None = None

    def apply(self, step: int, elapsed_s: float) -> float:
        """Set the learning rates of optimiser step `step` (0-based), `elapsed_s` into the budget (each group's
        `lr_scale` times the schedule's); returns the schedule's."""
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            progress = (step - self.warmup) / max(1, self.steps - self.warmup)
            if self.time_budget_s:
                progress = max(progress, elapsed_s / self.time_budget_s)
            factor = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        for group in self.optimiser.param_groups:
            group["lr"] = self.peak_lr * factor * group.get("lr_scale", 1.0)
        return self.peak_lr * factor


def optimise(loss: Tensor, optimiser: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """One optimiser step on `loss`, gradients clipped to `max_grad_norm` (ten summed step losses can spike)."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimiser.param_groups for p in group["params"]], max_grad_norm)
    optimiser.step()
