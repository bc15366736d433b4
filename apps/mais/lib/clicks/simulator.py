"""Simulated clicks, shared by training (`lib.training`) and evaluation: one set of rules for both.

Conventions
- One volume is a boolean numpy array [D0, D1, D2]; a batch is a boolean tensor [B, 1, D0, D1, D2].
- A click is a voxel index (d0, d1, d2) of the array it was placed on, and a label: 1 positive (the voxel
  belongs to the object), 0 negative (it does not), -1 padding (no click: there is nothing left to correct, or
  no object). Training places clicks on 128^3 crops, in the index order the model's `point_coords` use; the
  evaluation and a server session place them on the original image file ([i, j, k]), which the session maps
  into its crop windows.

Rules
- First click, inside the object: `"center"` = its interior-most voxel (maximum of the Euclidean distance
  transform), `"random"` = a uniformly drawn object voxel.
- Next click, from the error between ground truth and prediction: `"center"` = interior-most voxel of the
  largest error component (false-negative and false-positive components are labelled separately, so a component
  is all one kind; the rule of the CVPR 2025 interactive 3D challenge), `"random"` = a uniformly drawn error
  voxel (SAM-Med3D's training rule). Positive on a false negative, negative on a false positive.
- `"deepest"`, batches on the device only (`sample_clicks`; training): the voxel deepest inside the object, or
  inside the errors, by chessboard distance (repeated 3^3 erosion), ties broken at random. It approximates
  `"center"` without a distance transform on the host, which would bound a GPU's training loop: it does not
  separate error components, so the deepest error voxel lies in the thickest error rather than the largest.
- Noise (optional): Gaussian jitter of the position, and with some probability a "wrong-side" click that lands
  on a voxel just outside the region it was meant for (one voxel across its boundary), keeping its label.

`PLACEMENT_RULES` names the placement rules ("center", "random", "deepest"); `CLICK_PRESETS` names the complete click
settings (first rule, next rule, noise) that training, validation and the evaluation choose from.

Randomness comes only from a `numpy.random.Generator` passed in; the batched torch helper draws its torch seed
from it, so one seed fixes every click.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

POSITIVE, NEGATIVE, PADDING = 1, 0, -1
# Voxels that touch by a face, an edge or a corner are one part of a mask.
CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)

ClickRule = Literal["center", "random", "deepest"]
PLACEMENT_RULES = ("center", "random", "deepest")
BATCH_ONLY_RULES = ("deepest",)
# Erosion steps of the "deepest" rule: deeper than this (voxels) counts as this deep, which only matters for
# errors over 2 x 24 voxels thick, where any of their central voxels is a good click.
MAX_DEPTH_VOXELS = 24


def _check_rule(rule: str, batched: bool = True) -> None:
    if rule not in PLACEMENT_RULES:
        raise ValueError(f"unknown click rule {rule!r}; expected one of {PLACEMENT_RULES}")
    if not batched and rule in BATCH_ONLY_RULES:
        raise ValueError(f"click rule {rule!r} places clicks on batches only (sample_clicks)")


@dataclass(frozen=True)
class ClickNoise:
    """How far simulated clicks stray from the rule; zeros = exact clicks."""

    jitter_voxels: float = 0.0  # standard deviation of a Gaussian offset per axis, in voxels
    wrong_side_probability: float = 0.0  # chance that a click lands just outside the region it was meant for

    def __post_init__(self) -> None:
        if self.jitter_voxels < 0 or not 0 <= self.wrong_side_probability <= 1:
            raise ValueError(f"invalid click noise {self}")

    @property
    def is_exact(self) -> bool:
        return self.jitter_voxels == 0 and self.wrong_side_probability == 0


@dataclass(frozen=True)
class ClickConfig:
    """Which rule places the first and the following clicks, and how noisy they are."""

    first_click: ClickRule = "center"
    next_click: ClickRule = "center"
    noise: ClickNoise = ClickNoise()

    def __post_init__(self) -> None:
        for rule in (self.first_click, self.next_click):
            _check_rule(rule)


# Named click settings. "random" is SAM-Med3D's training rule (uniformly drawn error voxels), the training
# default; "center" is the deterministic rule of validation and evaluation (interior-most voxel of the largest
# error, the CVPR 2025 interactive 3D challenge's); "noisy" adds an annotator's imprecision to it.
CLICK_PRESETS = {
    "center": ClickConfig(first_click="center", next_click="center"),
    "random": ClickConfig(first_click="random", next_click="random"),
    "noisy": ClickConfig(
        first_click="center", next_click="center", noise=ClickNoise(jitter_voxels=1.5, wrong_side_probability=0.1)
    ),
}


def click_preset(name: str) -> ClickConfig:
    """The preset `name` of CLICK_PRESETS; an unknown name is refused."""
    if name not in CLICK_PRESETS:
        raise ValueError(f"unknown click preset {name!r}; expected one of {sorted(CLICK_PRESETS)}")
    return CLICK_PRESETS[name]


@dataclass(frozen=True)
class Click:
    """One click: `coord` (d0, d1, d2) voxel index of the array it was placed on (module docstring: a crop in
    training, the original image file in a session); `label` 1 positive or 0 negative."""

    coord: tuple[int, int, int]
    label: int


# ---------------------------------------------------------------------------------------------- one volume


def interior_point(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """The voxel of `region` farthest from its boundary.

    region: bool [D0, D1, D2], not empty. The crop border counts as boundary (a structure cut by the crop is not
    "deepest" at the cut). Ties are broken at random with `rng`. Returns (d0, d1, d2).
    """
    distance, origin = _distance_to_boundary(region)
    candidates = np.argwhere(distance == distance.max())
    chosen = candidates[rng.integers(len(candidates))] + origin
    return _as_coord(chosen)


def distance_to_boundary(region: np.ndarray) -> np.ndarray:
    """float [D0, D1, D2]: Euclidean distance of each region voxel to the nearest voxel outside it or outside the
    volume; 0 outside the region. Exposed so tests and evaluation can check `interior_point` against it."""
    distance, origin = _distance_to_boundary(region)
    full = np.zeros(region.shape, dtype=distance.dtype)
    full[tuple(slice(o, o + s) for o, s in zip(origin, distance.shape))] = distance
    return full


def random_point(region: np.ndarray, rng: np.random.Generator) -> tuple[int, int, int]:
    """A voxel of `region` (bool [D0, D1, D2], not empty) drawn uniformly with `rng`. Returns (d0, d1, d2)."""
    flat_index = rng.choice(np.flatnonzero(region))
    return _as_coord(np.unravel_index(flat_index, region.shape))


def error_regions(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false_negative, false_positive) bool [D0, D1, D2] of prediction `pred` against ground truth `gt`."""
    _check_pair(gt, pred)
    return gt & ~pred, pred & ~gt


def largest_error_component(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, bool] | None:
    """The largest 26-connected component of the false negatives or of the false positives.

    gt, pred: bool [D0, D1, D2]. Returns (component bool [D0, D1, D2], is_false_negative), or None when the
    prediction equals the ground truth. A tie in size goes to the false negatives (adding is what users do first).
    """
    best: tuple[int, np.ndarray, bool] | None = None
    for errors, is_false_negative in zip(error_regions(gt, pred), (True, False)):
        component = _largest_component(errors)
        if component is not None:
            size = int(component.sum())
            if best is None or size > best[0]:
                best = (size, component, is_false_negative)
    return None if best is None else (best[1], best[2])


def first_click(
    gt: np.ndarray, rng: np.random.Generator, rule: ClickRule = "center", noise: ClickNoise = ClickNoise()
) -> Click | None:
    """The first click on object `gt` (bool [D0, D1, D2]): positive, inside it; None if `gt` is empty."""
    _check_rule(rule, batched=False)
    if not gt.any():
        return None
    coord = interior_point(gt, rng) if rule == "center" else random_point(gt, rng)
    return add_noise(Click(coord, POSITIVE), gt, rng, noise)


def next_click(
    gt: np.ndarray,
    pred: np.ndarray,
    rng: np.random.Generator,
    rule: ClickRule = "center",
    noise: ClickNoise = ClickNoise(),
) -> Click | None:
    """The click that corrects prediction `pred` of object `gt` (both bool [D0, D1, D2]).

    Positive on a false negative, negative on a false positive; None when there is no error.
    """
    _check_rule(rule, batched=False)
    if rule == "center":
        found = largest_error_component(gt, pred)
        if found is None:
            return None
        region, is_false_negative = found
        coord = interior_point(region, rng)
    else:
        false_negative, false_positive = error_regions(gt, pred)
        errors = false_negative | false_positive
        if not errors.any():
            return None
        coord = random_point(errors, rng)
        is_false_negative = bool(false_negative[coord])
        region = false_negative if is_false_negative else false_positive
    return add_noise(Click(coord, POSITIVE if is_false_negative else NEGATIVE), region, rng, noise)


def add_noise(click: Click, region: np.ndarray, rng: np.random.Generator, noise: ClickNoise) -> Click:
    """Perturb `click`, meant for `region` (bool [D0, D1, D2]), as `noise` says; the label is kept.

    A wrong-side click moves to a random voxel one step outside `region` (its outer shell); otherwise the jitter
    offset is added. Coordinates stay inside the volume.
    """
    if noise.is_exact:
        return click
    if noise.wrong_side_probability and rng.random() < noise.wrong_side_probability:
        shell = ndimage.binary_dilation(region, structure=np.ones((3, 3, 3), bool)) & ~region
        if shell.any():
            return Click(random_point(shell, rng), click.label)
    if noise.jitter_voxels:
        offset = np.rint(rng.normal(0.0, noise.jitter_voxels, size=3))
        moved = np.clip(np.asarray(click.coord) + offset, 0, np.asarray(region.shape) - 1)
        return Click(_as_coord(moved), click.label)
    return click


# ------------------------------------------------------------------------------------------ batch (torch)


def sample_clicks(
    gt_masks: Tensor, pred_masks: Tensor | None, rng: np.random.Generator, config: ClickConfig
) -> tuple[Tensor, Tensor]:
    """One simulated click per volume of a batch: the first click when `pred_masks` is None, else the next one.

    gt_masks, pred_masks: bool [B, 1, D0, D1, D2] on any device. Returns point_coords float32 [B, 1, 3]
    (d0, d1, d2) and point_labels int64 [B, 1] (1, 0, or -1 = padding where there is nothing to click), on the
    device of `gt_masks`. The `"random"` and `"deepest"` rules (and their noise) run with torch on that device,
    no copy to the host; the `"center"` rule needs distance transforms and runs with scipy on the CPU, one volume
    at a time.
    """
    if gt_masks.dtype != torch.bool or gt_masks.dim() != 5 or gt_masks.shape[1] != 1:
        raise ValueError(f"gt_masks must be bool [B, 1, D0, D1, D2], got {gt_masks.dtype} {tuple(gt_masks.shape)}")
    if pred_masks is not None and (pred_masks.dtype != torch.bool or pred_masks.shape != gt_masks.shape):
        raise ValueError(
            f"pred_masks must be bool {tuple(gt_masks.shape)}, got {pred_masks.dtype} {tuple(pred_masks.shape)}"
        )
    rule = config.first_click if pred_masks is None else config.next_click
    if rule == "center":
        return _sample_clicks_on_host(gt_masks, pred_masks, rng, config)
    pick = _deepest_voxels if rule == "deepest" else _random_voxels
    pred = None if pred_masks is None else pred_masks[:, 0]
    return _sample_clicks_on_device(gt_masks[:, 0], pred, rng, config.noise, pick)


def _sample_clicks_on_host(
    gt_masks: Tensor, pred_masks: Tensor | None, rng: np.random.Generator, config: ClickConfig
) -> tuple[Tensor, Tensor]:
    """`sample_clicks` through the numpy rules, volume by volume (for the distance-transform rule)."""
    gt_volumes = gt_masks[:, 0].cpu().numpy()
    pred_volumes = None if pred_masks is None else pred_masks[:, 0].cpu().numpy()
    clicks = []
    for index, gt in enumerate(gt_volumes):
        if pred_volumes is None:
            clicks.append(first_click(gt, rng, config.first_click, config.noise))
        else:
            clicks.append(next_click(gt, pred_volumes[index], rng, config.next_click, config.noise))
    point_coords = torch.tensor([[c.coord if c else (0, 0, 0)] for c in clicks], dtype=torch.float32)
    point_labels = torch.tensor([[c.label if c else PADDING] for c in clicks], dtype=torch.int64)
    return point_coords.to(gt_masks.device), point_labels.to(gt_masks.device)


def _sample_clicks_on_device(
    gt: Tensor, pred: Tensor | None, rng: np.random.Generator, noise: ClickNoise, pick
) -> tuple[Tensor, Tensor]:
    """A device rule: `pick(regions, generator)` (`_random_voxels` or `_deepest_voxels`) places the click in the
    object or in the errors. gt, pred: bool [B, D0, D1, D2]. Returns as `sample_clicks`."""
    generator = _torch_generator(rng, gt.device)
    if pred is None:
        region = gt
        coords, found = pick(region, generator)
        is_positive = found
    else:
        false_negative, false_positive = gt & ~pred, pred & ~gt
        coords, found = pick(false_negative | false_positive, generator)
        is_positive = _values_at(false_negative, coords) & found
        region = torch.where(is_positive[:, None, None, None], false_negative, false_positive)

    if noise.wrong_side_probability:
        moves = torch.rand(len(gt), generator=generator, device=gt.device) < noise.wrong_side_probability
        shell = F.max_pool3d(region[:, None].float(), 3, stride=1, padding=1)[:, 0].bool() & ~region
        shell_coords, has_shell = _random_voxels(shell, generator)
        coords = torch.where((moves & has_shell)[:, None], shell_coords, coords)
    if noise.jitter_voxels:
        offset = torch.randn(coords.shape, generator=generator, device=gt.device) * noise.jitter_voxels
        moved = (coords + offset.round().long()).unbind(1)
        # clamped axis by axis with the sizes as plain numbers: a tensor of them made here would be a copy to the
        # device that waits for it
        coords = torch.stack([axis.clamp(0, size - 1) for axis, size in zip(moved, gt.shape[1:])], dim=1)

    point_labels = torch.where(found, torch.where(is_positive, POSITIVE, NEGATIVE), PADDING)
    point_coords = torch.where(found[:, None], coords, 0).float()
    return point_coords[:, None], point_labels[:, None]


def _random_voxels(regions: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One uniformly drawn voxel per region. regions: bool [B, D0, D1, D2].

    Returns coords int64 [B, 3] ((0, 0, 0) for an empty region) and found bool [B]. The maximum of uniform keys
    over the region's voxels is a uniform draw, and argmax is deterministic on every device.
    """
    keys = torch.rand(regions.shape, generator=generator, device=regions.device)
    flat_index = keys.masked_fill_(~regions, -1.0).flatten(1).argmax(dim=1)
    found = regions.flatten(1).any(dim=1)
    return _unravel(flat_index, regions.shape[1:]), found


def _deepest_voxels(regions: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A voxel of each region among those farthest from its outside (and from the volume's border, as
    `interior_point` counts it), by chessboard distance up to MAX_DEPTH_VOXELS; ties drawn uniformly. regions:
    bool [B, D0, D1, D2]. Returns as `_random_voxels`.

    The depth is measured on 2^3 cells (a cell is inside when all its voxels are), which makes the repeated
    erosion 16 times cheaper (a GPU training step clicks 10 times); a region thinner than a cell has depth 0
    everywhere, so its click is a uniformly drawn voxel of it."""
    shape = regions.shape[1:]
    inside = F.pad(regions[:, None].float(), [p for size in reversed(shape) for p in (0, size % 2)])
    outside = 1.0 - (-F.max_pool3d(-inside, 2))  # [B, 1, D0 / 2, D1 / 2, D2 / 2]
    depth = 1.0 - outside[:, 0]
    for _ in range(MAX_DEPTH_VOXELS // 2 - 1):
        # a cell survives an erosion while no cell of its 3^3 neighbourhood is outside (the border is outside)
        outside = F.max_pool3d(F.pad(outside, (1,) * 6, value=1.0), 3, stride=1)
        depth += 1.0 - outside[:, 0]
    depth = F.interpolate(depth[:, None], scale_factor=2, mode="nearest")[:, 0, : shape[0], : shape[1], : shape[2]]
    keys = depth + 0.5 * torch.rand(regions.shape, generator=generator, device=regions.device)
    flat_index = keys.masked_fill_(~regions, -1.0).flatten(1).argmax(dim=1)
    found = regions.flatten(1).any(dim=1)
    return _unravel(flat_index, regions.shape[1:]), found


def _values_at(volumes: Tensor, coords: Tensor) -> Tensor:
    """volumes [B, D0, D1, D2] sampled at coords int64 [B, 3] -> [B]."""
    batch_index = torch.arange(len(volumes), device=volumes.device)
    return volumes[batch_index, coords[:, 0], coords[:, 1], coords[:, 2]]


def _unravel(flat_index: Tensor, shape: torch.Size) -> Tensor:
    """Flat indices [B] into a volume of `shape` (D0, D1, D2) -> coords int64 [B, 3]."""
    _, D1, D2 = shape
    return torch.stack([flat_index // (D1 * D2), (flat_index // D2) % D1, flat_index % D2], dim=1)


def _torch_generator(rng: np.random.Generator, device: torch.device) -> torch.Generator:
    """A torch generator on `device`, seeded from `rng` so the numpy seed fixes torch's draws too."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(rng.integers(2**62)))
    return generator


# -------------------------------------------------------------------------------------------------- helpers


def _distance_to_boundary(region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """EDT of `region` over its bounding box grown by one voxel (the EDT of the whole crop costs ~0.25 s at 128^3
    on a 2-core CPU; a lesion's box is a small fraction of it). Returns (distance over the box, box origin)."""
    if region.dtype != bool or region.ndim != 3 or not region.any():
        raise ValueError(f"region must be a non-empty bool [D0, D1, D2] array, got {region.dtype} {region.shape}")
    occupied = np.argwhere(region)
    lo, hi = occupied.min(axis=0), occupied.max(axis=0) + 1
    box = region[tuple(slice(a, b) for a, b in zip(lo, hi))]
    # Padding with background puts the crop border (and the box edge) one voxel away: the border is a boundary.
    distance = ndimage.distance_transform_edt(np.pad(box, 1))[1:-1, 1:-1, 1:-1]
    return distance, lo


def parts_holding(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    """The 26-connected parts of bool `mask` [D0, D1, D2] that hold one of `points` [N, 3] (voxel indices inside
    the mask's array), as a bool array of its shape; all False when no point lies on the mask."""
    # labelled through the transpose: the served mask is Fortran-ordered, and scipy labels a C-ordered array
    # faster (the 26-neighbourhood is symmetric, so the parts are the same); a lookup table beats np.isin
    parts, count = ndimage.label(mask.T, structure=CONNECTIVITY)
    parts = parts.T
    held = np.zeros(count + 1, dtype=bool)
    held[parts[tuple(np.asarray(points, dtype=int).reshape(-1, 3).T)]] = True
    held[0] = False
    return held[parts]


def _largest_component(mask: np.ndarray) -> np.ndarray | None:
    """The largest 26-connected component of bool `mask` [D0, D1, D2], or None if it is empty."""
    labelled, count = ndimage.label(mask, structure=CONNECTIVITY)
    if count == 0:
        return None
    sizes = np.bincount(labelled.ravel())
    sizes[0] = 0
    return labelled == sizes.argmax()


def _check_pair(gt: np.ndarray, pred: np.ndarray) -> None:
    if gt.dtype != bool or pred.dtype != bool or gt.shape != pred.shape or gt.ndim != 3:
        raise ValueError(
            f"gt and pred must be bool [D0, D1, D2] of one shape, got {gt.dtype} {gt.shape}, {pred.dtype} {pred.shape}"
        )


def _as_coord(index) -> tuple[int, int, int]:
    return tuple(int(i) for i in index)
