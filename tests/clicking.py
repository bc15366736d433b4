"""Clicking on a real server as 3D Slicer does, and measuring what comes back: shared by the test modules."""

from __future__ import annotations

import tempfile

import numpy as np
from monai.transforms import LoadImage
from monailabel.client import MONAILabelClient
from scipy import ndimage

from lib.clicks.simulator import POSITIVE, next_click
from lib.configs.labels import SAMPLE_LABELS

# The tests' downloaded results, in a folder of their own (the system's would work too: test_infer.py)
RESULTS_DIR = tempfile.mkdtemp(prefix="mais-test-results-")


def load(path) -> tuple[np.ndarray, np.ndarray]:
    """(array in MONAI's [i, j, k] order, RAS affine) of an image or result file."""
    image = LoadImage(image_only=True)(str(path))
    return np.asarray(image), np.asarray(image.affine)


def interior_voxel(label_file, value: int) -> list[int]:
    """The voxel deepest inside a structure (where an annotator clicks first)."""
    label, _ = load(label_file)
    depth = ndimage.distance_transform_edt(label == value)
    return [int(v) for v in np.unravel_index(np.argmax(depth), depth.shape)]


# brain1's lesion (in the shipped weights' training data) gets Dice 0.60 after its first click and 0.74 after its
# second (the evaluation's centre clicks); a mask drawn on the wrong voxels (a flipped axis, a shifted origin,
# another grid) scores near 0. The tests that check where a mask lands ask for this much.
BRAIN1_LESION_MIN_DICE = 0.5


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice computed here, not with lib.metrics: these helpers measure what the server answers, so their yardstick
    stays independent of the code under test."""
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def slicer_click(url: str, user: str, image: str, label: str, positives, negatives=(), **extra):
    """Slicer's DeepEdit request from `user` (its client_id): every label's full list, `label`, NRRD uint8."""
    client = MONAILabelClient(url, tmpdir=RESULTS_DIR, client_id=user)
    params = {name: [] for name in SAMPLE_LABELS}
    params.update({label: [list(p) for p in positives], "background": [list(n) for n in negatives]})
    params.update({"label": label, "result_extension": ".nrrd", "result_dtype": "uint8"}, **extra)
    result_file, result = client.infer("mais", image, params)
    mask, affine = load(result_file)
    return mask, affine, result


def dice_per_click(url: str, user: str, image: str, label: str, truth: np.ndarray, clicks: int) -> list[float]:
    """An annotator's session simulated over HTTP: the first click deepest inside `truth` (bool, original grid),
    each next one deepest inside the largest error, Slicer's full history every time; Dice after each click."""
    rng = np.random.default_rng(0)
    positives, negatives, scores = [], [], []
    mask = np.zeros_like(truth)
    for _ in range(clicks):
        click = next_click(truth, mask, rng) if scores else None
        coord = list(click.coord) if click else interior_voxel_of(truth)
        (positives if click is None or click.label == POSITIVE else negatives).append(coord)
        result, _, _ = slicer_click(url, user, image, label, positives, negatives, reset_state=not scores)
        mask = result > 0
        scores.append(dice(mask, truth))
    return scores


def interior_voxel_of(region: np.ndarray) -> list[int]:
    depth = ndimage.distance_transform_edt(region)
    return [int(v) for v in np.unravel_index(np.argmax(depth), depth.shape)]
