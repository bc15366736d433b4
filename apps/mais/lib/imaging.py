"""From an image file to the model's space and back: the geometry every click and mask goes through.

Model space is what SAM-Med3D was trained on: RAS orientation, isotropic voxels (below), z-normalised intensities
(CT clamped to [-1000, 1000] HU first), and 128^3 crops of it. Clicks arrive as integer voxel indices `[i, j, k]`
of the ORIGINAL file (i = fastest axis, MONAI's array order before any reorientation) and are mapped through the
real affines, never by flipping indices, so they land right on non-RAS and anisotropic images (MONAI Label
issue #1407). Results are resampled back onto the exact original grid.

Model space is finer than SAM-Med3D's 1.5 mm where memory allows: at 1.5 mm a 15 mm structure (an amygdala,
a lesion) is under one of the encoder's 24 mm patches and 2-3 of the decoder's 6 mm cells, which caps what any
click can fix (a perfect prediction on the decoder's grid reaches Dice 0.56-0.63 on Colin27's amygdalae).
Measured with one set of weights (generalist run 5) on the 14 held-out real structures of Colin27, brain2, lung2
(benchmarks/results/generalist/README.md): mean Dice after 10 clicks 0.51 at 1.5 mm, 0.63 at 1.0 mm, 0.68 at
0.75 mm, 0.63 at 0.5 mm (the window then covers too little of a large structure). So an image is resampled to
DETAIL_SPACING_MM (0.75 mm), or as fine as MAX_MODEL_VOXELS allows for a large field of view
(`model_spacing_mm`; a 36 x 36 x 37 cm CT gets 1.26 mm), never coarser than 1.5 mm.

A small image is seen finer still: an image whose field of view is at most half a 1.5 mm window along every axis (a
cropped region such as breast1, 30 x 80 x 44 mm) would fill under 1/8 of the window, the rest padding, and its
lesions would be one or two of the mask decoder's 6 mm cells (measured: the breast1 lesion got Dice 0.004, the
mask being the whole image block). Such an image is resampled to FINE_SPACING_MM voxels instead
(`model_spacing_mm`). Training sees that scale through `ModelSpaceImage.zoomed` crops of small structures.

Training and inference share `normalise_intensity`, `CropWindow` and the model-space constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.transforms import LoadImage, Orientation, Spacing, SpatialCrop, SpatialResample
from torch import Tensor

MODEL_SPACING_MM = 1.5
CROP_SIZE = 128
# The model space of small images: 4x finer, so that one cell of the mask decoder's 32^3 output grid (4 voxels)
# is one 1.5 mm voxel and a 6 mm lesion spans 4 cells instead of one; a window covers 48 mm.
FINE_SPACING_MM = MODEL_SPACING_MM / 4
# Images no larger than this along every axis (half a 1.5 mm window) are small (module docstring).
SMALL_IMAGE_MM = CROP_SIZE * MODEL_SPACING_MM / 2
# Model space's voxel for an image of ordinary size (module docstring), and how many voxels its resampled copy
# may have before the voxel grows (96 MB of float32 image shared by its sessions, 48 MB of float16 logits each).
DETAIL_SPACING_MM = MODEL_SPACING_MM / 2
MAX_MODEL_VOXELS = 24 * 2**20
# A click closer than this to a crop face (model voxels) gets a crop centred on it instead: the network sees
# too little context around a click at the very edge of its window.
CROP_MARGIN = 16
# Values below this only occur in CT (air is -1000 HU); MR and PET are >= 0 after scanner rescaling.
CT_DETECTION_HU = -500.0
CT_CLAMP_HU = (-1000.0, 1000.0)
# Passed explicitly: MONAI warns that the default of Orientation's `labels` will change.
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
# Logit used for model-space voxels no window has predicted yet: certainly background.
BACKGROUND_LOGIT = -20.0


class VolumeError(ValueError):
    """The image cannot be segmented (not 3D, unreadable, not finite); the message says why."""


def load_volume(path: str) -> MetaTensor:
    """Read a 3D image file. Returns a MetaTensor [1, I, J, K] float32 with its RAS world `affine` [4, 4]."""
    try:
        volume = LoadImage(image_only=True, ensure_channel_first=True, dtype=np.float32)(path)
    except Exception as error:  # readers raise many types; all mean "not an image we can read"
        raise VolumeError(f"cannot read image {path}: {error}") from error
    if volume.ndim != 4 or volume.shape[0] != 1:
        shape = tuple(volume.shape[1:]) if volume.shape[0] == 1 else tuple(volume.shape)
        raise VolumeError(f"MAIS segments 3D volumes; this image has shape {shape} ({len(shape)}D)")
    if min(volume.shape[1:]) < 2:
        raise VolumeError(f"MAIS segments 3D volumes; this image has shape {tuple(volume.shape[1:])}")
    # a NaN or an infinity spreads through the normalisation into every voxel: the mask would be silently wrong
    not_finite = int((~torch.isfinite(volume)).sum())
    if not_finite:
        raise VolumeError(
            f"image {path} has {not_finite} of {volume.numel()} voxels that are NaN or infinite; "
            "MAIS needs finite intensities"
        )
    return volume


@dataclass(frozen=True)
class IntensityNormalisation:
    """SAM-Med3D's normalisation: clamp CT to [-1000, 1000] HU, then z-normalise with the statistics of the
    voxels brighter than the volume mean (the body, not the surrounding air).

    Measured once on a whole image (`of`) and applied to any view of it, so that a zoomed view of a lesion is
    scaled like the whole image the network learnt from, not by the lesion's own statistics. mean, std: 0-d.
    """

    clamp_ct: bool
    mean: Tensor
    std: Tensor

    @classmethod
    def of(cls, volume: Tensor) -> IntensityNormalisation:
        """The normalisation of volume [..., X, Y, Z] float."""
        clamp_ct = bool(volume.min() < CT_DETECTION_HU)
        if clamp_ct:
            volume = volume.clamp(*CT_CLAMP_HU)
        foreground = volume[volume > volume.mean()]
        if foreground.numel() < 2:
            foreground = volume.flatten()
        return cls(clamp_ct, foreground.mean(), foreground.std().clamp_min(1e-6))

    def __call__(self, volume: Tensor) -> Tensor:
        if self.clamp_ct:
            volume = volume.clamp(*CT_CLAMP_HU)
        return (volume - self.mean) / self.std


def normalise_intensity(volume: Tensor) -> Tensor:
    """volume [..., X, Y, Z] float normalised by its own statistics (`IntensityNormalisation`)."""
    return IntensityNormalisation.of(volume)(volume)


def normalise_batch(volumes: Tensor, inside: Tensor) -> Tensor:
    """volumes [N, ...] float each normalised as `IntensityNormalisation.of(volume[inside])` normalises it, and
    filled outside its field of view (inside bool [N, ...], at least one voxel each) with its normalised minimum,
    as `CropWindow.extract` pads a real image with `ModelSpaceImage.pad_value`. The same statistics as
    `IntensityNormalisation`, with masked sums instead of boolean indexing, so that a GPU batch (the training's
    synthesis) never waits for the host."""
    values, fov = volumes.flatten(1), inside.flatten(1)
    largest = torch.finfo(values.dtype).max
    is_ct = torch.where(fov, values, largest).amin(1, keepdim=True) < CT_DETECTION_HU
    values = torch.where(is_ct, values.clamp(*CT_CLAMP_HU), values)
    mean = torch.where(fov, values, 0.0).sum(1, keepdim=True) / fov.sum(1, keepdim=True).clamp_min(1)
    brighter = fov & (values > mean)
    foreground = torch.where(brighter.sum(1, keepdim=True) >= 2, brighter, fov)  # as `of` falls back
    count = foreground.sum(1, keepdim=True).clamp_min(1)
    foreground_mean = torch.where(foreground, values, 0.0).sum(1, keepdim=True) / count
    squares = torch.where(foreground, (values - foreground_mean) ** 2, 0.0).sum(1, keepdim=True)
    std = (squares / (count - 1).clamp_min(1)).sqrt().clamp_min(1e-6)  # unbiased, as Tensor.std()
    normalised = (values - foreground_mean) / std
    pad_value = torch.where(fov, normalised, largest).amin(1, keepdim=True)
    return torch.where(fov, normalised, pad_value).view_as(volumes)


def model_spacing_mm(original: MetaTensor) -> float:
    """The model space's voxel size for an image [1, I, J, K]: FINE_SPACING_MM for a small image, else
    DETAIL_SPACING_MM, coarser where the field of view would need more than MAX_MODEL_VOXELS, at most 1.5 mm."""
    affine = original.affine.double().numpy()
    corners_mm = _transform(affine, _box_corners(np.zeros(3), np.asarray(original.shape[1:]) - 1))
    extent_mm = np.ptp(corners_mm, axis=0) + np.abs(affine[:3, :3]).sum(1)  # centre to centre, plus one voxel
    if np.all(extent_mm <= SMALL_IMAGE_MM):
        return FINE_SPACING_MM
    spacing = max(DETAIL_SPACING_MM, float(np.prod(extent_mm) / MAX_MODEL_VOXELS) ** (1 / 3))
    return min(round(spacing, 3), MODEL_SPACING_MM)


def _box_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """The 8 corners [8, 3] of the axis-aligned box from `lo` [3] to `hi` [3] (both included)."""
    return np.array(np.meshgrid(*zip(lo, hi), indexing="ij")).reshape(3, -1).T


def _transform(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """points [N, 3] through the homogeneous affine [4, 4] -> [N, 3] float64."""
    return np.asarray(points, dtype=np.float64) @ affine[:3, :3].T + affine[:3, 3]


@dataclass(frozen=True)
class CropWindow:
    """A CROP_SIZE^3 window of model space; `start` is its first voxel (may be negative for small volumes:
    the outside is padded)."""

    start: tuple[int, int, int]

    @classmethod
    def around(cls, point: np.ndarray, volume_shape: tuple[int, int, int]) -> CropWindow:
        """The window centred on `point` [3] (model voxels), shifted to stay inside the volume where it fits."""
        start = []
        for centre, size in zip(np.round(point).astype(int), volume_shape):
            if size <= CROP_SIZE:
                start.append((size - CROP_SIZE) // 2)  # centre the small volume in the window
            else:
                start.append(int(np.clip(centre - CROP_SIZE // 2, 0, size - CROP_SIZE)))
        return cls(tuple(start))

    def contains(self, point: np.ndarray, margin: int = 0) -> bool:
        local = np.asarray(point) - np.asarray(self.start)
        return bool(np.all(local >= margin) and np.all(local < CROP_SIZE - margin))

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """Model-space voxel coordinates [N, 3] -> coordinates inside the window [N, 3]."""
        return np.asarray(points, dtype=np.float32) - np.asarray(self.start, dtype=np.float32)

    def slices(self, volume_shape: tuple[int, ...]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
        """(slices of the volume, slices of the window) where the two overlap."""
        volume_slices, window_slices = [], []
        for start, size in zip(self.start, volume_shape):
            lo, hi = max(start, 0), min(start + CROP_SIZE, size)
            volume_slices.append(slice(lo, hi))
            window_slices.append(slice(lo - start, hi - start))
        return tuple(volume_slices), tuple(window_slices)

    def overlap(self, other: CropWindow) -> tuple[slice, ...]:
        """The part of this window that `other` covers too, as slices of this window's coordinates."""
        relative = CropWindow(tuple(a - b for a, b in zip(self.start, other.start)))  # this window in other's frame
        return relative.slices((CROP_SIZE,) * 3)[1]

    def extract(self, volume: Tensor, fill: float) -> Tensor:
        """volume [C, X, Y, Z] -> window [C, 128, 128, 128], `fill` outside the volume."""
        out = volume.new_full((volume.shape[0], CROP_SIZE, CROP_SIZE, CROP_SIZE), fill)
        volume_slices, window_slices = self.slices(tuple(volume.shape[1:]))
        out[(slice(None), *window_slices)] = volume[(slice(None), *volume_slices)]
        return out

    def paste(self, canvas: Tensor, window: Tensor) -> None:
        """Write window [C, 128, 128, 128] into canvas [C, X, Y, Z] in place (the overlapping part)."""
        volume_slices, window_slices = self.slices(tuple(canvas.shape[1:]))
        canvas[(slice(None), *volume_slices)] = window[(slice(None), *window_slices)]


class ModelSpaceImage:
    """One image in model space, with what is needed to map clicks in and masks out.

    volume: [1, X, Y, Z] float32, RAS, `spacing_mm` voxels (`model_spacing_mm`: 0.75-1.5 mm, FINE_SPACING_MM for
    a small image; FINE_SPACING_MM for a zoomed view), normalised. original_shape: (I, J, K) of the file. A zoomed
    view covers only a region of the file, but maps clicks and masks from and to the whole file's grid like the
    full view.
    """

    def __init__(
        self,
        original: MetaTensor,
        spacing_mm: float | None = None,
        region: tuple[np.ndarray, np.ndarray] | None = None,
        intensity: IntensityNormalisation | None = None,
    ):
        """original [1, I, J, K] from `load_volume`. spacing_mm: default `model_spacing_mm(original)`. region: the
        [lo, hi) box of original voxels to resample (default: all). intensity: the normalisation to apply
        (default: measured on this volume)."""
        spacing_mm = spacing_mm if spacing_mm is not None else model_spacing_mm(original)
        self.original_shape: tuple[int, int, int] = tuple(int(s) for s in original.shape[1:])
        self.original_affine = original.affine.double().clone()
        self.spacing_mm = spacing_mm
        source = original if region is None else SpatialCrop(roi_start=region[0], roi_end=region[1])(original)
        resampled = Spacing(pixdim=(spacing_mm,) * 3, mode="bilinear")(
            Orientation(axcodes="RAS", labels=RAS_LABELS)(source)
        )
        self.affine = resampled.affine.double().clone()
        raw = resampled.as_tensor().float()
        self.intensity = intensity if intensity is not None else IntensityNormalisation.of(raw)
        self.volume: Tensor = self.intensity(raw).contiguous()
        self.pad_value = float(self.volume.min())
        # original voxel index <-> model voxel index, homogeneous [4, 4]
        self._original_to_model = torch.linalg.inv(self.affine) @ self.original_affine
        self._model_to_original = torch.linalg.inv(self._original_to_model)

    @classmethod
    def from_file(cls, path: str, spacing_mm: float | None = None) -> ModelSpaceImage:
        """The image file at `path` in model space (`spacing_mm` as in the constructor)."""
        return cls(load_volume(path), spacing_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.volume.shape[1:])

    @property
    def nbytes(self) -> int:
        return self.volume.numel() * self.volume.element_size()

    def zoomed(
        self, original: MetaTensor, original_point: np.ndarray, spacing_mm: float = FINE_SPACING_MM
    ) -> ModelSpaceImage:
        """A view of one window of `spacing_mm` voxels centred on `original_point` [3] (original voxel indices),
        resampled from `original` (the file this image was made from, at its own resolution) and normalised like
        this image."""
        half_mm = np.full(3, CROP_SIZE * spacing_mm / 2)
        centre_world = _transform(self.original_affine.numpy(), np.asarray(original_point)[None])[0]
        corners_world = _box_corners(centre_world - half_mm, centre_world + half_mm)
        corners_original = _transform(np.linalg.inv(self.original_affine.numpy()), corners_world)
        # one voxel more on each side: the bilinear resampling needs its neighbours at the faces
        lo = np.clip(np.floor(corners_original.min(0)).astype(int) - 1, 0, self.original_shape)
        hi = np.clip(np.ceil(corners_original.max(0)).astype(int) + 2, 0, self.original_shape)
        view = ModelSpaceImage(original, spacing_mm, (lo, hi), self.intensity)
        view.pad_value = self.pad_value  # beyond the file the view shows what the full image shows there
        return view

    def to_model_voxels(self, original_ijk: np.ndarray) -> np.ndarray:
        """Original-file voxel indices [N, 3] -> model-space voxel coordinates [N, 3] float (not rounded)."""
        return _transform(self._original_to_model.numpy(), original_ijk)

    def resample_label(self, label: MetaTensor) -> Tensor:
        """A label map on the original grid [1, I, J, K] -> the same labels on the model grid [1, X, Y, Z] (int)."""
        resampled = SpatialResample(mode="nearest", dtype=torch.float32)(
            label.float(), dst_affine=self.affine.float(), spatial_size=self.shape
        )
        return resampled.as_tensor().round().to(torch.int64)

    def original_box(self, model_lo: np.ndarray, model_hi: np.ndarray) -> tuple[slice, ...]:
        """The original voxels whose centres fall in the model-space box [model_lo, model_hi) (may be empty)."""
        corners_original = _transform(self._model_to_original.numpy(), _box_corners(model_lo, np.asarray(model_hi) - 1))
        lo = np.clip(np.floor(corners_original.min(0)).astype(int), 0, self.original_shape)
        hi = np.clip(np.ceil(corners_original.max(0)).astype(int) + 1, 0, self.original_shape)
        return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))

    def to_original_grid(
        self, model_logits: Tensor, model_lo: np.ndarray, model_hi: np.ndarray
    ) -> tuple[tuple[slice, ...], np.ndarray]:
        """Resample the model-space box [model_lo, model_hi) of logits [1, X, Y, Z] onto the original grid.

        Returns (slices of the original grid, boolean mask there): the original voxels whose centres fall in the
        box; the caller pastes them into the full mask. Resampling only where a click can have changed the mask
        keeps a later click cheap (the whole window's footprint on Colin27 took 0.35 s on 2 CPU cores).
        """
        box = self.original_box(model_lo, model_hi)
        lo = np.array([b.start for b in box])
        box_shape = tuple(b.stop - b.start for b in box)
        if min(box_shape) <= 0:
            return box, np.zeros(box_shape, dtype=bool)
        # the source is cut to the box plus one voxel (trilinear support)
        src_lo = np.maximum(np.asarray(model_lo) - 1, 0)
        src_hi = np.minimum(np.asarray(model_hi) + 1, self.shape)
        source = model_logits[(slice(None), *(slice(int(a), int(b)) for a, b in zip(src_lo, src_hi)))]
        grid = _sampling_grid(self._original_to_model.numpy(), lo, box_shape, src_lo, source.shape[1:], source.device)
        # grid_sample itself, not MONAI's SpatialResample: the same trilinear values, without ~200 small tensor
        # operations of MetaTensor and affine bookkeeping a click (on a GPU each a launch, some a host sync)
        resampled = F.grid_sample(source[None].float(), grid, padding_mode="border", align_corners=True)
        return box, (resampled[0, 0] > 0).cpu().numpy()


def _sampling_grid(
    original_to_model: np.ndarray,
    box_lo: np.ndarray,
    box_shape: tuple[int, int, int],
    source_lo: np.ndarray,
    source_shape: tuple[int, ...],
    device: torch.device,
) -> Tensor:
    """`F.grid_sample`'s grid [1, *box_shape, 3] (align_corners=True) that reads, for every original voxel of the
    box starting at `box_lo`, the model-space source cut starting at `source_lo` (shape `source_shape`) where
    `original_to_model` [4, 4] puts the voxel's centre."""
    linear = original_to_model[:3, :3]
    offset = linear @ box_lo + original_to_model[:3, 3] - source_lo  # box voxel 0 in source voxels
    scale = 2.0 / np.maximum(np.asarray(source_shape) - 1, 1)  # source voxels -> [-1, 1]; an axis of 1 reads 0
    # the grid's last axis is (Z, Y, X) for a [N, C, X, Y, Z] input: reversed
    steps = torch.as_tensor((linear * scale[:, None])[::-1].copy(), dtype=torch.float32, device=device)
    grid = torch.as_tensor((offset * scale - 1)[::-1].copy(), dtype=torch.float32, device=device)
    grid = grid.expand(*box_shape, 3).clone()
    for axis, size in enumerate(box_shape):
        index_shape = [1, 1, 1, 1]
        index_shape[axis] = size
        grid += torch.arange(size, dtype=torch.float32, device=device).view(index_shape) * steps[:, axis]
    return grid[None]
