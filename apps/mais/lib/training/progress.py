"""What a training run reports while it runs: a log line every `log_every` steps, and validations that keep the
best weights."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lib.model.mais import Mais
from lib.model.weights import save_mais
from lib.training.config import FitConfig
from lib.training.data_sources import EmbeddingCache
from lib.training.real_data import StructureCrop
from lib.training.validation import ValidationResult, validate

logger = logging.getLogger(__name__)

# Click numbers whose Dice is logged (1-based); those beyond K are left out.
LOGGED_CLICKS = (1, 5, 10)


@dataclass
class TrainingLog:
    """One log line: means over the last `log_every` steps. dice_at_click: {click number: mean hard Dice}."""

    step: int
    steps: int
    loss: float
    dice_at_click: dict[int, float]
    lr: float
    samples_per_s: float
    elapsed_s: float


def training_log(window: deque, step: int, steps: int, lr: float, samples_per_s: float, elapsed: float) -> TrainingLog:
    """The log line of `window`: (loss, dice_per_click [K]) of the recent steps."""
    losses = [loss for loss, _ in window]
    dice = torch.stack([d for _, d in window]).mean(0)
    dice_at_click = {k: float(dice[k - 1]) for k in LOGGED_CLICKS if k <= len(dice)}
    return TrainingLog(step, steps, float(np.mean(losses)), dice_at_click, lr, samples_per_s, elapsed)


def format_log(log: TrainingLog, cache: EmbeddingCache | None) -> str:
    dice = " ".join(f"dice@{k} {v:.3f}" for k, v in log.dice_at_click.items())
    cached = f" cache {len(cache.embeddings)} images, {cache.hits} hits" if cache is not None else ""
    return (
        f"step {log.step}/{log.steps} loss {log.loss:.4f} {dice} lr {log.lr:.2e} "
        f"{log.samples_per_s:.2f} samples/s {log.elapsed_s:.0f} s{cached}"
    )


class ValidationTracker:
    """Runs `validate` (on rank 0), keeps the baseline (the starting weights, step 0 of a fresh run) and the kept
    result since, and writes the weights to `config.best_path` whenever a result is kept: one that beats the
    baseline and, with `keep_weights` "best", every result kept before."""

    def __init__(
        self,
        config: FitConfig,
        crops: Sequence[StructureCrop],
        model: Mais,
        cache: EmbeddingCache | None,
        on_validation: Callable[[ValidationResult], None] | None,
    ) -> None:
        self.config, self.crops, self.model, self.on_validation = config, list(crops), model, on_validation
        # the cache's "validation:<i>" keys never meet the training keys ("real:...", "synthetic:...")
        self.embed = (lambda key, volume: cache.embed(model, [key], volume)) if cache is not None else None
        self.baseline: ValidationResult | None = None
        self.best: ValidationResult | None = None
        self.best_step = 0

    def run(self, step: int) -> ValidationResult:
        result = validate(self.model, self.crops, self.config.clicks, step, self.embed, seed=self.config.seed)
        dice = " ".join(f"dice@{k} {v:.3f}" for k, v in result.dice_at(LOGGED_CLICKS).items())
        if step == 0:
            self.baseline = result
            logger.info("validation before training (%d crops): %s score %.4f", len(self.crops), dice, result.score)
        else:
            rivals = (self.baseline, self.best) if self.config.keep_weights == "best" else (self.baseline,)
            improved = result.score > max((r.score for r in rivals if r is not None), default=-1.0)
            if improved:
                self.best, self.best_step = result, step
                save_mais(
                    self.model,
                    self.config.best_path,
                    metadata={
                        "trained_steps": step,
                        "validation": {"dice_per_click": result.dice_per_click, "score": result.score},
                    },
                )
            logger.info(
                "validation at step %d: %s score %.4f%s", step, dice, result.score, " (kept)" if improved else ""
            )
        if self.on_validation is not None:
            self.on_validation(result)
        return result
