"""The benchmarks' and the concurrency test's faster next click (`annotators.boxed_next_click`) places the very
click the simulator's `next_click` places on the whole volume, for both click rules."""

from __future__ import annotations

import numpy as np
import pytest
from monai.transforms import LoadImage
from scipy import ndimage

from annotators import boxed_next_click
from lib.clicks.simulator import next_click
from server import SAMPLE_DATA

STRUCTURES = [("lung1.nii.gz", 1), ("colin27_t1.nii.gz", 13), ("brain1.nrrd", 1)]


def predictions(truth: np.ndarray) -> list[np.ndarray]:
    """Masks a click can follow: empty, too large, too small, shifted, exact, and errors at the volume's corners."""
    corner, far_corner = truth.copy(), truth.copy()
    corner[:5, :5, :5] = True
    far_corner[-1, -1, -1] = True
    return [
        np.zeros_like(truth),
        ndimage.binary_dilation(truth, iterations=2),
        ndimage.binary_erosion(truth),
        np.roll(truth, 3, axis=0),
        truth.copy(),
        corner,
        far_corner,
    ]


@pytest.mark.parametrize("file_name, value", STRUCTURES)
@pytest.mark.parametrize("rule", ["center", "random"])
def test_the_boxed_click_is_the_whole_volume_click(file_name, value, rule):
    truth = np.asarray(LoadImage(image_only=True)(str(SAMPLE_DATA / "labels" / "final" / file_name))) == value
    for seed, mask in enumerate(predictions(truth)):
        whole = next_click(truth, mask, np.random.default_rng(seed), rule=rule)
        boxed = boxed_next_click(truth, mask, np.random.default_rng(seed), rule=rule)
        assert boxed == whole, (file_name, rule, seed)


def test_an_empty_truth_and_mask_has_no_click():
    empty = np.zeros((4, 5, 6), bool)
    assert boxed_next_click(empty, empty, np.random.default_rng(0)) is None
