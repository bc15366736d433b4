"""Training crops from labelled images: every label of a multi-label map is its own binary target.

Crops are taken as inference takes them (`lib.imaging`): model space (RAS, 0.375-1.5 mm, normalised), a 128^3
window around a voxel of the structure. Training crops are shifted off that voxel by up to `max_shift` voxels per
axis: windows centred on their structure teach a model to segment whatever lies at the centre and to ignore where the
clicks are (measured: clicks off the centre of such a crop got the centre's structure), and at inference only
the first click's window is centred on it, later clicks and neighbouring windows are not.

Small structures (under ZOOM_TRAINING_MAX_MM along every axis) also get crops in a zoomed view
(`ModelSpaceImage.zoomed`, FINE_SPACING_MM voxels around a voxel of the structure): the scale a small image is
segmented at (lib/imaging.py), so the network learns what a lesion looks like four times finer, resampled from
thick slices.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from lib.imaging import MODEL_SPACING_MM, CropWindow, ModelSpaceImage, load_volume
from lib.training.data_sources import save_training_pair
from lib.volume_formats import volume_extension

logger = logging.getLogger(__name__)

# Structures smaller than this (30 voxels of 1.5 mm, ~0.1 ml) are mostly partial-volume noise of a resampled
# label: skipped. A volume, not a voxel count, so that it means the same in a small image's 0.375 mm model space.
MIN_STRUCTURE_MM3 = 30 * MODEL_SPACING_MM**3
# Training crops: the structure voxel lands anywhere in the central 2 * 40 = 80 voxels of the 128 of each axis.
MAX_CROP_SHIFT = 40
# Zoomed crops: structures whose whole extent fits in 3/4 of a zoomed window (48 mm), so that they are seen whole
# with context around them, as a lesion in a small image is; the window stays near its structure voxel.
ZOOM_TRAINING_MAX_MM = 36.0
MAX_ZOOMED_SHIFT = 8

T = TypeVar("T")


@dataclass
class StructureCrop:
    """volume: [1, 128, 128, 128] float32 normalised; mask: [1, 128, 128, 128] bool; name: `image:label`."""

    volume: Tensor
    mask: Tensor
    name: str


def structure_crops(
    image_path: str | Path,
    label_path: str | Path,
    label_map: dict[str, int],
    rng: np.random.Generator,
    crops_per_structure: int = 1,
    exclude: frozenset[str] = frozenset(),
    max_shift: int = MAX_CROP_SHIFT,
    zoomed_crops_per_structure: int = 0,
) -> list[StructureCrop]:
    """Crops of every labelled structure of one image (labels named in `exclude` are left out), each around a
    random voxel of its structure shifted by up to `max_shift` voxels per axis (0: centred, as validation is),
    plus `zoomed_crops_per_structure` zoomed crops of each small structure (module docstring)."""
    original = load_volume(str(image_path))
    image = ModelSpaceImage(original)
    original_labels = load_volume(str(label_path))
    labels = image.resample_label(original_labels)
    image_name = image_id(image_path)
    crops = []
    for label_name, index in label_map.items():
        if index == 0 or label_name in exclude:
            continue
        structure = labels == index
        voxels = torch.nonzero(structure[0])
        if len(voxels) * image.spacing_mm**3 < MIN_STRUCTURE_MM3:
            continue
        for _ in range(crops_per_structure):
            centre = voxels[rng.integers(len(voxels))].numpy() + rng.integers(-max_shift, max_shift + 1, size=3)
            window = CropWindow.around(centre, image.shape)
            crops.append(
                StructureCrop(
                    volume=window.extract(image.volume, fill=image.pad_value),
                    mask=window.extract(structure, fill=False),
                    name=f"{image_name}:{label_name}",
                )
            )
        extent_mm = (voxels.max(0).values - voxels.min(0).values + 1).numpy() * image.spacing_mm
        if zoomed_crops_per_structure and np.all(extent_mm <= ZOOM_TRAINING_MAX_MM):
            original_voxels = torch.nonzero(original_labels[0] == index).numpy()
            for _ in range(zoomed_crops_per_structure):
                point = original_voxels[rng.integers(len(original_voxels))]
                view = image.zoomed(original, point)
                crops.append(_zoomed_crop(view, original_labels, index, point, rng, f"{image_name}:{label_name}"))
    logger.info("%s: %d crops", image_name, len(crops))
    return crops


def _zoomed_crop(
    view: ModelSpaceImage, original_labels: Tensor, index: int, point: np.ndarray, rng: np.random.Generator, name: str
) -> StructureCrop:
    """A crop of label `index` in the zoomed `view` around original voxel `point` [3], shifted by up to
    MAX_ZOOMED_SHIFT fine voxels."""
    centre = view.to_model_voxels(point[None])[0] + rng.integers(-MAX_ZOOMED_SHIFT, MAX_ZOOMED_SHIFT + 1, size=3)
    window = CropWindow.around(centre, view.shape)
    structure = view.resample_label(original_labels) == index
    return StructureCrop(
        volume=window.extract(view.volume, fill=view.pad_value), mask=window.extract(structure, fill=False), name=name
    )


def image_id(image_path: str | Path) -> str:
    """The datastore id of an image file: its name without the volume extension. Not the name up to its first dot:
    a DICOMweb datastore's images are `<SeriesInstanceUID>.nii.gz`, and UIDs are dotted."""
    name = Path(image_path).name
    return name.removesuffix(volume_extension(name) or "")


def split_by_image(items: Sequence[T], val_fraction: float, rng: np.random.Generator) -> tuple[list[T], list[T]]:
    """(training, validation) items, whole images on either side, so validation never sees a training image.

    round(len * val_fraction) images validate, at least one when the fraction is > 0 and there are two or more;
    with one image, or a fraction of 0, everything trains and the validation list is empty.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = [items[i] for i in rng.permutation(len(items))]
    count = 0 if val_fraction == 0 or len(items) < 2 else min(len(items) - 1, max(1, round(len(items) * val_fraction)))
    return order[count:], order[:count]


def labelled_images(studies: Path) -> list[tuple[Path, Path]]:
    """(image, label) pairs of a MONAI Label local datastore: images with a `labels/final` file of the same name."""
    final = studies / "labels" / "final"
    return [(image, final / image.name) for image in sorted(studies.iterdir()) if (final / image.name).is_file()]


def main(argv: list[str] | None = None) -> None:
    """Write training pairs (`python -m lib.training.fit --data-dir`) from a datastore's final labels."""
    import argparse

    from lib.configs.labels import SAMPLE_LABELS

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--studies", type=Path, required=True, help="MONAI Label local datastore folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the *.pt pairs")
    parser.add_argument("--crops-per-structure", type=int, default=4)
    parser.add_argument("--exclude", default="", help="comma-separated labels held out of training")
    parser.add_argument("--exclude-images", default="", help="comma-separated image names held out of training")
    parser.add_argument("--max-shift", type=int, default=MAX_CROP_SHIFT, help="crop offset from the structure")
    parser.add_argument(
        "--zoomed-crops-per-structure", type=int, default=0, help="crops in the zoomed view of each small structure"
    )
    parser.add_argument(
        "--structure-fraction", type=float, default=1.0, help="keep this seeded share of the structures (small data)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    rng = np.random.default_rng(args.seed)
    exclude = frozenset(filter(None, args.exclude.split(",")))
    excluded_images = set(filter(None, args.exclude_images.split(",")))
    names = [name for name, index in SAMPLE_LABELS.items() if index and name not in exclude]
    kept = set(rng.choice(names, size=max(1, round(len(names) * args.structure_fraction)), replace=False))
    exclude |= frozenset(names) - kept
    logger.info("training structures: %s", sorted(kept))
    args.out.mkdir(parents=True, exist_ok=True)
    count = 0
    for image_path, label_path in labelled_images(args.studies):
        if image_id(image_path) in excluded_images:
            continue
        crops = structure_crops(
            image_path,
            label_path,
            SAMPLE_LABELS,
            rng,
            args.crops_per_structure,
            exclude,
            args.max_shift,
            args.zoomed_crops_per_structure,
        )
        for crop in crops:
            save_training_pair(args.out / f"{crop.name.replace(':', '_')}_{count:04d}.pt", crop.volume, crop.mask)
            count += 1
    print(f"{count} training pairs in {args.out}")


if __name__ == "__main__":
    main()
