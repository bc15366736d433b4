"""scripts/build_sample_dicom.py: the sample volumes as DICOM series, read back by two DICOM readers."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from monai.transforms import LoadImage, Orientation

import build_sample_dicom
from server import SAMPLE_DATA

RAS = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


@pytest.mark.parametrize("reader", ["PydicomReader", "ITKReader"])
@pytest.mark.parametrize("name, source", [("brain1", "brain1.nrrd"), ("lung1", "lung1.nii.gz")])
def test_series_has_the_source_voxels_at_the_source_positions(sample_dicom, reader, name, source):
    """brain1 is LAS with 6.5 mm slices: a flipped axis or a swapped spacing would show here."""
    original = LoadImage(image_only=True, ensure_channel_first=True)(str(SAMPLE_DATA / source))
    read_back = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(str(sample_dicom / name))
    original, read_back = RAS(original), RAS(read_back)
    assert read_back.shape == original.shape
    np.testing.assert_allclose(np.asarray(read_back.affine), np.asarray(original.affine), atol=1e-4)
    np.testing.assert_array_equal(np.asarray(read_back), np.asarray(original))


def test_series_tags_and_stable_uids(sample_dicom, tmp_path):
    brain1 = [pydicom.dcmread(p) for p in sorted((sample_dicom / "brain1").iterdir())]
    lung1 = pydicom.dcmread(next((sample_dicom / "lung1").iterdir()))
    assert len(brain1) == 25 and brain1[0].Modality == "MR" and lung1.Modality == "CT"
    assert len({ds.SeriesInstanceUID for ds in brain1}) == 1 and brain1[0].SeriesInstanceUID != lung1.SeriesInstanceUID
    assert len({ds.SOPInstanceUID for ds in brain1}) == 25
    build_sample_dicom.main(["--out", str(tmp_path), "--images", "brain1"])  # a second run writes the same UIDs
    assert pydicom.dcmread(tmp_path / "brain1" / "0000.dcm").SOPInstanceUID == brain1[0].SOPInstanceUID


def test_non_integer_volumes_are_rescaled_within_one_step():
    volume = np.linspace(-3.7, 1234.56, 1000).reshape(10, 10, 10)
    stored, slope, intercept = build_sample_dicom.to_int16(volume)
    assert stored.dtype == np.int16
    assert np.abs(stored * slope + intercept - volume).max() <= slope / 2 + 1e-9
