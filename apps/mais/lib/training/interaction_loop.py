"""The interaction loop of a training step: K simulated clicks on a batch, run exactly as the infer task runs clicks.

Step k = 1..K (the infer task does the same for each user click, with the user's click instead of a simulated one):
    1. click_k = the simulator's first click (k = 1) or the click correcting mask_{k-1} (k > 1)
    2. the clicks so far [B, k, 3] / [B, k] in crop voxels (d0, d1, d2), oldest first; a row with nothing left
       to correct gets a padding point (label -1)
    3. out_k = the interaction step (`lib.model.interaction`, the one the server's session runs): the prompt
       encoder gets all k clicks or only click_k (the model's config.prompt_clicks), the memory holds steps
       1..k-1 and the previous mask is out_{k-1}.low_res_logits (none for k = 1); step k's memory entry is
       pushed after it
    4. logits_k = out_k.logits [B, 1, 128, 128, 128] (upsampled, refined when the model has the refinement head);
       mask_k = logits_k > 0, the mask the next click corrects
Loss = sum over k of Dice(logits_k, ground truth), plus ce_weight * binary cross-entropy when asked, plus
click_weight * the cross-entropy at the clicks so far (`click_loss`) when asked.

The refinement head, with gradients, runs at ONE step of each sequence, drawn at random (so it learns every
stage of an interaction): at full resolution its backward costs as much as the rest of a step at a large batch
(measured on an H200: batch 96 went from 78 to 38 samples/s with it at every step). Its other steps' logits
are the decoder's upsampled. At the refined step the loss adds the decoder's own low-res logits against the
ground truth averaged down to 32^3 (soft targets), so the decoder's mask stays a mask of its own (it is fed
back as the previous mask, and it is the model with the head switched off). Without gradients (validation)
every step is refined, as at inference.

Gradients: the fed-back low-res logits are detached (at inference they are a given input; it also keeps every
step's decoder graph on its own), while memory entries keep their graph (lib/model/memory_bank.py), so the loss of
step k trains the memory write path of the steps before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lib.clicks.simulator import CLICK_PRESETS, ClickConfig, ClickNoise, sample_clicks
from lib.metrics import batch_dice
from lib.model.interaction import InteractionState, concat_points
from lib.model.refinement import click_blocks

# SAM-Med3D trains with uniformly drawn error voxels; the distance-transform rule is the evaluation's.
TRAINING_CLICKS = CLICK_PRESETS["random"]
# The "mixed" training clicks, one drawn per step: SAM-Med3D's uniform error voxels, the deepest error voxel
# (where an annotator fixes the worst mistake: what makes the model obey a correction) and that click placed
# imprecisely, near or just across the error's boundary, as a hurried annotator does.
MIXED_TRAINING_CLICKS = (
    TRAINING_CLICKS,
    ClickConfig(first_click="deepest", next_click="deepest"),
    ClickConfig(
        first_click="deepest", next_click="deepest", noise=ClickNoise(jitter_voxels=2.0, wrong_side_probability=0.15)
    ),
)
TRAINING_CLICK_MIXES = {"random": (TRAINING_CLICKS,), "mixed": MIXED_TRAINING_CLICKS}


@dataclass(frozen=True)
class InteractionConfig:
    """How one training sample is interacted with."""

    num_clicks: int = 10  # K
    clicks: ClickConfig | tuple[ClickConfig, ...] = TRAINING_CLICKS  # several: one drawn (uniformly) per step
    ce_weight: float = 0.0  # MAIS trains with Dice only; SAM-Med3D adds cross-entropy with weight 1
    # The whole-crop losses weigh the few voxels around a click like any other, so a network can leave a clicked
    # voxel wrong (the shipped run 14: after a centre-of-error click its own voxel stayed wrong in 34 % of the
    # held-out steps). This weight adds the cross-entropy at the clicks themselves (`click_loss`).
    click_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.num_clicks < 1 or self.ce_weight < 0 or self.click_weight < 0 or self.clicks == ():
            raise ValueError(f"invalid interaction config {self}")

    def click_rule(self, rng: np.random.Generator) -> ClickConfig:
        """The click settings of the next step."""
        if isinstance(self.clicks, ClickConfig):
            return self.clicks
        return self.clicks[int(rng.integers(len(self.clicks)))] if len(self.clicks) > 1 else self.clicks[0]


@dataclass
class InteractionResult:
    """loss: scalar, summed over the K steps (each a batch mean). dice_per_click: float32 [K], detached, the batch
    mean of the hard Dice (mask = logits > 0) after each click. final_masks: bool [B, 1, S, S, S] after click K."""

    loss: Tensor
    dice_per_click: Tensor
    final_masks: Tensor


def run_interaction(
    model: torch.nn.Module,
    image_embeddings: Tensor,
    volumes: Tensor,
    gt_masks: Tensor,
    rng: np.random.Generator,
    config: InteractionConfig = InteractionConfig(),
) -> InteractionResult:
    """K interaction steps on a batch, in the order of the module docstring.

    model: a `lib.model.mais.Mais`. image_embeddings [B, E, 8, 8, 8] from `model.embed_image` (with or without
    a graph: a trainable encoder gets its gradient through them) of volumes [B, 1, S, S, S] (what the
    refinement head and the high-resolution features see). gt_masks bool [B, 1, S, S, S] on the model's
    device, S = 128. rng drives the click simulator. Call inside torch.autocast for mixed precision: the loss is
    computed in float32.
    """
    if gt_masks.dtype != torch.bool or gt_masks.shape[0] != image_embeddings.shape[0]:
        raise ValueError(f"gt_masks must be bool [B, 1, S, S, S] with B = {image_embeddings.shape[0]}")
    B = gt_masks.shape[0]
    target = gt_masks.float()  # converted once: a 128^3 bool -> float copy per step is measurable on the CPU
    refined_step = None  # every step (no refinement head, or no gradients), else the one step the head runs at
    if model.config.refinement and torch.is_grad_enabled():
        refined_step = int(rng.integers(config.num_clicks))
    state = InteractionState.start(model, batch_size=B, volume=volumes)
    click_coords = click_labels = masks = None
    step_losses, step_dice = [], []
    for k in range(config.num_clicks):
        new_coords, new_labels = sample_clicks(gt_masks, masks, rng, config.click_rule(rng))
        click_coords, click_labels = concat_points(click_coords, click_labels, new_coords, new_labels)
        refine = refined_step is None or k == refined_step
        out = state.step(model, image_embeddings, volumes, click_coords, click_labels, refine)
        logits = out.logits.float()
        loss = segmentation_loss(logits, target, config.ce_weight)
        if model.config.refinement and refine:
            # the decoder's own mask, against the target averaged down to its grid
            low_res_target = F.adaptive_avg_pool3d(target, out.low_res_logits.shape[-3:])
            loss = loss + segmentation_loss(out.low_res_logits.float(), low_res_target, config.ce_weight)
        if config.click_weight:
            loss = loss + config.click_weight * click_loss(logits, target, click_coords, click_labels)
        step_losses.append(loss)
        masks = logits.detach() > 0
        step_dice.append(batch_dice(masks, gt_masks).float().mean())
    return InteractionResult(torch.stack(step_losses).sum(), torch.stack(step_dice).float(), masks)


def segmentation_loss(logits: Tensor, target: Tensor, ce_weight: float = 0.0) -> Tensor:
    """Batch mean of soft Dice loss (+ ce_weight * BCE). logits, target float [B, 1, ...] (target in [0, 1])."""
    loss = soft_dice_loss(logits, target).mean()
    if ce_weight:
        loss = loss + ce_weight * F.binary_cross_entropy_with_logits(logits, target)
    return loss


def click_loss(logits: Tensor, target: Tensor, click_coords: Tensor, click_labels: Tensor) -> Tensor:
    """Binary cross-entropy on the 3^3 voxels around each click (the block the refinement head draws, clamped
    onto the crop), against the ground truth there (a noisy click placed across the boundary is not taught as
    its label). logits, target float [B, 1, S, S, S]; click_coords
    [B, N, 3] float crop voxels, click_labels [B, N] (-1: padding, left out). A scalar; 0 without clicks."""
    flat, _ = click_blocks(click_coords.round().long(), logits.shape[-1])  # the crop is a cube
    flat = flat.flatten(1)  # [B, N * 27]
    valid = (click_labels >= 0)[:, :, None].expand(-1, -1, 27).flatten(1).float()
    at_clicks = logits.flatten(1).gather(1, flat)
    truth = target.flatten(1).gather(1, flat)
    losses = F.binary_cross_entropy_with_logits(at_clicks, truth, reduction="none")
    return (losses * valid).sum() / valid.sum().clamp(min=1)


def soft_dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - soft Dice per sample. logits, target float [B, 1, ...] -> [B]. `smooth` keeps tiny objects stable."""
    probabilities = torch.sigmoid(logits).flatten(1)
    target = target.flatten(1)
    overlap = (probabilities * target).sum(1)
    return 1.0 - (2.0 * overlap + smooth) / (probabilities.sum(1) + target.sum(1) + smooth)
