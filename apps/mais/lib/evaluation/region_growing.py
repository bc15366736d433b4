"""The classical baseline of the evaluation: confidence-connected region growing from the clicks, no learning.

What an annotator already has in any ITK-based tool: SimpleITK's ConfidenceConnected filter grows from the
positive clicks (seeds) over the voxels whose intensity lies within `multiplier` standard deviations of the
statistics around the seeds (re-estimated `iterations` times); then every voxel nearer a negative click than to
every positive click is cut away (Euclidean distance in mm on the file's grid, with its voxel spacing), and what
the cut leaves unconnected to every seed goes too. It runs
on the ORIGINAL image grid, click by click, through the same stepping interface as the model's session
(`add_click`, `mask`), so lib.evaluation.evaluate drives both with the same clicks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
from monai.data import MetaTensor

from lib.clicks.simulator import POSITIVE, Click, parts_holding

BASELINE_NAME = "region_growing"


@dataclass(frozen=True)
class RegionGrowingConfig:
    """ITK's ConfidenceConnected parameters (its defaults but a wider band and a 1-voxel seed neighbourhood)."""

    multiplier: float = 2.5
    iterations: int = 3
    neighbourhood_radius: int = 1  # voxels around each seed that give the first statistics


def grow(
    image: np.ndarray, spacing_mm: np.ndarray, clicks: list[Click], config: RegionGrowingConfig = RegionGrowingConfig()
) -> np.ndarray:
    """The baseline's mask bool [I, J, K] for image float [I, J, K] (the file's grid) and the clicks so far."""
    positives = [c.coord for c in clicks if c.label == POSITIVE]
    negatives = [c.coord for c in clicks if c.label != POSITIVE]
    if not positives:
        return np.zeros(image.shape, dtype=bool)
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(image.transpose(2, 1, 0), dtype=np.float32))
    itk_image.SetSpacing([float(s) for s in spacing_mm])
    grown = sitk.ConfidenceConnected(
        itk_image,
        seedList=[tuple(int(v) for v in p) for p in positives],  # ITK's (x, y, z) = the array's (i, j, k)
        numberOfIterations=config.iterations,
        multiplier=config.multiplier,
        initialNeighborhoodRadius=config.neighbourhood_radius,
        replaceValue=1,
    )
    mask = sitk.GetArrayFromImage(grown).transpose(2, 1, 0).astype(bool)
    for p in positives:  # a clicked voxel is always in, even where its own intensity is an outlier
        mask[tuple(p)] = True
    if negatives and mask.any():
        mask &= ~_nearer_negative(mask, spacing_mm, positives, negatives)
        # what the cut separated from every seed is no longer grown from one: keep the seeds' components
        mask = parts_holding(mask, np.array(positives))
    return mask


def _nearer_negative(
    mask: np.ndarray, spacing_mm: np.ndarray, positives: list[tuple], negatives: list[tuple]
) -> np.ndarray:
    """bool [I, J, K]: voxels of the mask's bounding box nearer (mm) some negative click than every positive."""
    voxels = np.argwhere(mask)
    lo, hi = voxels.min(0), voxels.max(0) + 1
    axes_mm = [np.arange(a, b, dtype=np.float32) * np.float32(s) for a, b, s in zip(lo, hi, spacing_mm)]

    def nearest(points: list[tuple]) -> np.ndarray:
        """Squared distance (mm^2) of every box voxel to the nearest of points [(i, j, k)]: per-axis terms broadcast
        over the box, so no [..., 3] coordinate grid is built (a whole-brain box would be 400 MB)."""
        best = None
        for point in np.asarray(points, dtype=np.float32) * spacing_mm.astype(np.float32):
            d0, d1, d2 = ((axis - c) ** 2 for axis, c in zip(axes_mm, point))
            squared = d0[:, None, None] + d1[None, :, None] + d2[None, None, :]
            best = squared if best is None else np.minimum(best, squared)
        return best

    cut = np.zeros(mask.shape, dtype=bool)
    cut[tuple(slice(a, b) for a, b in zip(lo, hi))] = nearest(negatives) < nearest(positives)
    return cut


@dataclass
class RegionGrowingSession:
    """The baseline behind the session interface: `add_click(click)` regrows from all clicks so far; `mask` bool
    [I, J, K] on the image file's grid."""

    image: np.ndarray  # float [I, J, K], the file's intensities
    spacing_mm: np.ndarray  # [3]
    config: RegionGrowingConfig = RegionGrowingConfig()
    clicks: list[Click] = field(default_factory=list, init=False)
    mask: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.mask = np.zeros(self.image.shape, dtype=bool)

    @classmethod
    def of(cls, original: MetaTensor, config: RegionGrowingConfig = RegionGrowingConfig()) -> RegionGrowingSession:
        """From lib.imaging.load_volume's [1, I, J, K] image."""
        return cls(np.asarray(original[0], dtype=np.float32), original.pixdim.numpy(), config)

    def add_click(self, click: Click) -> None:
        self.clicks.append(click)
        self.mask = grow(self.image, self.spacing_mm, self.clicks, self.config)
