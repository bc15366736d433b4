"""scripts/build_large_ct.py: lung1 resampled along z keeps its field of view, its intensities and its lesion."""

from __future__ import annotations

import nibabel as nib
import numpy as np

import build_large_ct
from server import SAMPLE_DATA


def test_the_resampled_ct_covers_the_same_scan_with_its_lesion(tmp_path):
    image_id = build_large_ct.build(tmp_path, slices=96)  # 300 in the benchmark; 96 keeps the test quick
    assert image_id == "lung1_96"
    source, built = nib.load(SAMPLE_DATA / "lung1.nii.gz"), nib.load(tmp_path / "lung1_96.nii.gz")
    label = nib.load(tmp_path / "labels" / "final" / "lung1_96.nii.gz")
    assert built.shape == label.shape == (512, 512, 96)
    assert built.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    np.testing.assert_allclose(built.header.get_zooms(), (0.5703125, 0.5703125, 2.5), atol=1e-5)

    def outer_faces(image):
        return [(image.affine @ [0, 0, k, 1])[2] for k in (-0.5, image.shape[2] - 0.5)]

    np.testing.assert_allclose(outer_faces(built), outer_faces(source), atol=1e-3)
    # every second new slice centre falls between two old ones: the values lie between theirs
    old, new = np.asarray(source.dataobj), np.asarray(built.dataobj)
    assert new.min() >= old.min() and new.max() <= old.max()
    np.testing.assert_array_equal(new[:, :, 0], old[:, :, 0])  # clamped at the first slice

    old_lesion = np.asarray(nib.load(SAMPLE_DATA / "labels" / "final" / "lung1.nii.gz").dataobj) == 1
    new_lesion = np.asarray(label.dataobj) == 1
    assert new_lesion.sum() == 2 * old_lesion.sum()  # nearest slice: each old slice twice
    centre = [
        (img.affine @ np.r_[np.argwhere(m).mean(axis=0), 1])[:3]
        for img, m in ((source, old_lesion), (built, new_lesion))
    ]
    np.testing.assert_allclose(centre[0], centre[1], atol=1.5)
