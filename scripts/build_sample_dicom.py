"""Write sample-data's volumes as DICOM series, one file per slice, for a PACS (Orthanc) and OHIF.

    .venv/bin/python scripts/build_sample_dicom.py --out /tmp/sample-dicom [--images brain1,lung1]

Geometry comes from the affine MONAI reads from the source file (RAS), turned into DICOM's patient space (LPS):
columns run along the volume's first axis, rows along its second, slice k sits at the affine's image of voxel
(0, 0, k). Pixel values are stored as int16, with RescaleSlope/Intercept where the source is not integer-valued.
UIDs are derived from the image name, so every run writes the same series (a PACS upload is idempotent).
Volumes of the same name prefix (colin27_t1, colin27_t1_brain) are not related: each image is its own study.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pydicom
from monai.transforms import LoadImage
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO_ROOT / "sample-data"
SOP_CLASSES = {"CT": "1.2.840.10008.5.1.4.1.1.2", "MR": "1.2.840.10008.5.1.4.1.1.4"}
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
INT16 = np.iinfo(np.int16)


def sample_images() -> dict[str, Path]:
    """{image name: file} of sample-data's volumes."""
    files = sorted(p for p in SAMPLE_DATA.iterdir() if p.name.endswith((".nii.gz", ".nrrd")))
    return {p.name.split(".")[0]: p for p in files}


def modality_of(volume: np.ndarray) -> str:
    """CT if the values look like Hounsfield units (air around -1000), else MR."""
    return "CT" if volume.min() < -500 else "MR"


def to_int16(volume: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(stored int16 values, RescaleSlope, RescaleIntercept) with stored * slope + intercept ~ volume."""
    if np.all(np.mod(volume, 1) == 0) and volume.min() >= INT16.min and volume.max() <= INT16.max:
        return volume.astype(np.int16), 1.0, 0.0
    low, high = float(volume.min()), float(volume.max())
    slope = max(high - low, 1e-6) / (INT16.max - INT16.min)
    intercept = low - INT16.min * slope
    return np.round((volume - intercept) / slope).astype(np.int16), slope, intercept


def write_series(name: str, source: Path, out_dir: Path) -> Path:
    """Write `source` as a DICOM series into out_dir/<name>/; returns that folder."""
    image = LoadImage(image_only=True)(str(source))
    volume = np.asarray(image, dtype=np.float64)
    if volume.ndim != 3:
        raise ValueError(f"{source}: expected a 3D volume, got shape {volume.shape}")
    lps = RAS_TO_LPS @ np.asarray(image.affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    row_direction, column_direction = lps[:3, 0] / spacing[0], lps[:3, 1] / spacing[1]
    stored, slope, intercept = to_int16(volume)
    modality = modality_of(volume)
    study_uid, series_uid, frame_uid = (
        generate_uid(entropy_srcs=[name, part]) for part in ("study", "series", "frame")
    )

    series_dir = out_dir / name
    series_dir.mkdir(parents=True, exist_ok=True)
    for k in range(volume.shape[2]):
        sop_uid = generate_uid(entropy_srcs=[name, "slice", str(k)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SOP_CLASSES[modality]
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(series_dir / f"{k:04d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = SOP_CLASSES[modality], sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.Modality = modality
        ds.PatientName, ds.PatientID = f"MAIS^{name}", f"mais-{name}"
        ds.StudyDescription, ds.SeriesDescription = f"MAIS sample {name}", name
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.StudyDate = ds.SeriesDate = "20261127"
        ds.ImagePositionPatient = [float(v) for v in (lps @ [0.0, 0.0, k, 1.0])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in (*row_direction, *column_direction)]
        # DICOM: PixelSpacing = (distance between rows, distance between columns) = (along j, along i)
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = ds.SpacingBetweenSlices = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:.10g}", f"{intercept:.10g}"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # [rows = j, columns = i]
        ds.is_little_endian, ds.is_implicit_VR = True, False
        ds.save_as(series_dir / f"{k:04d}.dcm", write_like_original=False)
    return series_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for one sub-folder per series")
    parser.add_argument("--images", default="", help="comma-separated image names (default: all of sample-data)")
    args = parser.parse_args(argv)
    images = sample_images()
    wanted = [n for n in args.images.split(",") if n] or list(images)
    unknown = sorted(set(wanted) - set(images))
    if unknown:
        parser.error(f"unknown image(s) {unknown}; sample-data has {sorted(images)}")
    for name in wanted:
        series_dir = write_series(name, images[name], args.out)
        first = pydicom.dcmread(next(series_dir.iterdir()), stop_before_pixels=True)
        print(f"{name}: {len(list(series_dir.iterdir()))} slices, SeriesInstanceUID {first.SeriesInstanceUID}")


if __name__ == "__main__":
    sys.exit(main())
