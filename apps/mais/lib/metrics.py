"""Dice, the one overlap measure of training, validation, evaluation and active learning."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def batch_dice(masks: Tensor, truths: Tensor) -> Tensor:
    """Dice per sample of bool masks [B, ...] against bool truths of the same shape -> float64 [B]; 1 where both
    are empty. float64 keeps whole-image counts exact; `.float()` of it equals a float32 computation of the same
    counts (below 2^24 voxels)."""
    masks, truths = masks.flatten(1), truths.flatten(1)
    # count_nonzero counts bools without the int64 copy that sum() makes
    overlap = torch.count_nonzero(masks & truths, dim=1).double()
    total = (torch.count_nonzero(masks, dim=1) + torch.count_nonzero(truths, dim=1)).double()
    return torch.where(total > 0, 2.0 * overlap / total.clamp_min(1.0), torch.ones_like(total))


def dice(mask: np.ndarray, truth: np.ndarray) -> float:
    """Dice of one bool mask against a bool truth of the same shape (numpy arrays); 1 when both are empty."""
    if mask.shape != truth.shape:
        raise ValueError(f"mask {mask.shape} and truth {truth.shape} differ in shape")
    masks, truths = (torch.from_numpy(np.asarray(a, dtype=bool))[None] for a in (mask, truth))
    return float(batch_dice(masks, truths)[0])
