"""How unsure the model is about an image nobody has labelled: the score active learning ranks images by.

An interactive model is sure of an image region when nearby clicks give the same mask. For a few automatic
first clicks per image (probes), the click is repeated at small offsets along each axis; the disagreement of a
probe is 1 - mean Dice between the mask of the original click and the masks of the moved ones, and the image's
score is the mean over its probes. A high score marks an image where the model's masks hinge on where exactly
the user clicks: the images where labels teach it most. It needs no labels, no dropout and one encoder pass per
probe (about 0.1 s on a CPU with the light model).

Probes land on bright voxels (above the image's foreground mean after normalisation), where structures are,
drawn with a seeded generator so a score is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lib.imaging import CROP_SIZE, CropWindow, ModelSpaceImage
from lib.metrics import batch_dice
from lib.model.interaction import InteractionState
from lib.model.mais import Mais


@dataclass(frozen=True)
class ProbeConfig:
    probes: int = 4  # automatic first clicks per image
    offset_voxels: int = 3  # how far the repeated clicks move (model voxels), +/- along each axis
    seed: int = 0


def image_disagreement(model: Mais, image: ModelSpaceImage, config: ProbeConfig = ProbeConfig()) -> float:
    """Mean probe disagreement in [0, 1] of one image (see the module docstring)."""
    rng = np.random.default_rng(config.seed)
    return float(
        np.mean(
            [click_disagreement(model, image, p, config.offset_voxels) for p in probe_points(image, config.probes, rng)]
        )
    )


def probe_points(image: ModelSpaceImage, count: int, rng: np.random.Generator) -> np.ndarray:
    """count model-space voxels [count, 3] drawn among the bright ones (all voxels if none is bright)."""
    bright = torch.nonzero(image.volume[0] > 0)
    if len(bright) == 0:
        bright = torch.nonzero(torch.ones_like(image.volume[0], dtype=torch.bool))
    return bright[rng.choice(len(bright), size=count, replace=len(bright) < count)].numpy()


@torch.inference_mode()
def click_disagreement(model: Mais, image: ModelSpaceImage, point: np.ndarray, offset_voxels: int) -> float:
    """1 - mean Dice between the mask of a first click at `point` (model voxels [3]) and the masks of the same
    click moved by +/- offset_voxels along each axis; all seven predicted as one batch from one embedding."""
    device = next(model.parameters()).device
    window = CropWindow.around(point, image.shape)
    crop = window.extract(image.volume, fill=image.pad_value)[None].to(device)
    embedding = model.embed_image(crop)
    centre = window.to_local(point[None])[0]
    offsets = np.concatenate([np.zeros((1, 3)), np.eye(3) * offset_voxels, -np.eye(3) * offset_voxels])
    clicks = np.clip(centre + offsets, 0, CROP_SIZE - 1)
    batch = len(clicks)
    crops = crop.expand(batch, -1, -1, -1, -1)
    out = InteractionState.start(model, batch_size=batch, volume=crops).step(
        model,
        embedding.expand(batch, -1, -1, -1, -1),
        crops,
        torch.as_tensor(clicks, dtype=torch.float32, device=device)[:, None],
        torch.ones(batch, 1, dtype=torch.int64, device=device),
    )
    masks = out.logits > 0
    return float(1.0 - batch_dice(masks[1:], masks[:1].expand_as(masks[1:])).float().mean())
