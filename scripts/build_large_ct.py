#!/usr/bin/env python3
"""A large CT for the server benchmarks: sample-data's lung1 (512 x 512 x 48, 0.57 x 0.57 x 5 mm) resampled along
z to 512 x 512 x 300, i.e. the same 292 x 292 x 240 mm field of view in 0.8 mm slices, as a thin-slice
reconstruction of the same scan would give. Written with its label into a MONAI Label local datastore:

    <studies>/lung1_300.nii.gz                 int16 Hounsfield units, linear interpolation between slices
    <studies>/labels/final/lung1_300.nii.gz    uint8 lesion = 1, nearest slice (the 15 mm lesion: 19 slices)

The affine is lung1's with the z axis scaled to the new slice thickness and shifted so that the first and last
slices' outer faces stay where lung1's were. 78.6 M voxels: 6.25 x lung1's, so a click's result on the original
grid (resampling back, writing, sending, reading) costs 6.25 x as much. Start the server after this (its
datastore indexes the folder at start); its image id is `lung1_300`:

    python3 scripts/build_large_ct.py /tmp/studies          # a copy of sample-data (tests/server.py copies one)
    python3 benchmarks/bench_server.py --url http://127.0.0.1:8000 --studies /tmp/studies --large-ct
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample-data"
SOURCE = "lung1.nii.gz"
SLICES = 300
IMAGE_ID = f"lung1_{SLICES}"
FILE_NAME = f"{IMAGE_ID}.nii.gz"


def z_positions(old_slices: int, new_slices: int) -> np.ndarray:
    """Where each new slice's centre falls in the old slice index (same outer extent, -0.5 .. old - 0.5)."""
    step = old_slices / new_slices
    return -0.5 + (np.arange(new_slices) + 0.5) * step


def resampled_affine(affine: np.ndarray, old_slices: int, new_slices: int) -> np.ndarray:
    step = old_slices / new_slices
    index_map = np.eye(4)
    index_map[2, 2], index_map[2, 3] = step, -0.5 + 0.5 * step  # new index k -> old index
    return affine @ index_map


def resample_image(volume: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Linear interpolation along the last axis, clamped at the ends; int16 like the source."""
    low = np.clip(np.floor(positions).astype(int), 0, volume.shape[2] - 2)
    weight = np.clip(positions - low, 0.0, 1.0).astype(np.float32)
    out = np.empty(volume.shape[:2] + (len(positions),), dtype=volume.dtype)
    for k, (z, w) in enumerate(zip(low, weight)):
        value = volume[:, :, z].astype(np.float32) * (1 - w) + volume[:, :, z + 1].astype(np.float32) * w
        out[:, :, k] = np.rint(value).astype(volume.dtype)
    return out


def resample_label(label: np.ndarray, positions: np.ndarray) -> np.ndarray:
    nearest = np.clip(np.rint(positions).astype(int), 0, label.shape[2] - 1)
    return np.ascontiguousarray(label[:, :, nearest])


def save_like(data: np.ndarray, affine: np.ndarray, source: nib.Nifti1Image, path: Path) -> None:
    image = nib.Nifti1Image(data, affine)
    image.header.set_xyzt_units(*source.header.get_xyzt_units())
    image.set_qform(affine, code=int(source.header["qform_code"]))
    image.set_sform(affine, code=int(source.header["sform_code"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def build(studies: Path, source_dir: Path = SAMPLE_DATA, slices: int = SLICES) -> str:
    """Write the resampled CT and its label into `studies`; returns the image id."""
    image_id = f"lung1_{slices}"
    ct = nib.load(source_dir / SOURCE)
    label = nib.load(source_dir / "labels" / "final" / SOURCE)
    old_slices = ct.shape[2]
    positions = z_positions(old_slices, slices)
    affine = resampled_affine(ct.affine, old_slices, slices)
    volume = np.asarray(ct.dataobj)
    lesion = np.asarray(label.dataobj)
    new_volume = resample_image(volume, positions)
    new_lesion = resample_label(lesion, positions)
    if not new_lesion.any():
        raise SystemExit("the resampled label lost the lesion")
    save_like(new_volume, affine, ct, studies / f"{image_id}.nii.gz")
    save_like(new_lesion, affine, label, studies / "labels" / "final" / f"{image_id}.nii.gz")
    return image_id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", type=Path, help="the datastore folder to write into")
    parser.add_argument("--source", type=Path, default=SAMPLE_DATA, help="the folder holding lung1 and its label")
    parser.add_argument("--slices", type=int, default=SLICES)
    args = parser.parse_args()
    started = time.perf_counter()
    image_id = build(args.studies, args.source, args.slices)
    path = args.studies / f"{image_id}.nii.gz"
    image = nib.load(path)
    lesion = np.asarray(nib.load(args.studies / "labels" / "final" / f"{image_id}.nii.gz").dataobj)
    print(
        f"{path}: {image.shape} voxels of {tuple(round(float(z), 4) for z in image.header.get_zooms())} mm, "
        f"{path.stat().st_size / 1e6:.1f} MB; lesion {int(lesion.sum())} voxels in slices "
        f"{np.flatnonzero(lesion.any(axis=(0, 1)))[[0, -1]].tolist()}; {time.perf_counter() - started:.1f} s"
    )


if __name__ == "__main__":
    main()
