"""The click simulator's rules (lib.clicks.simulator), on small hand-made volumes. CPU only, no server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from lib.clicks.simulator import (
    NEGATIVE,
    PADDING,
    POSITIVE,
    ClickConfig,
    ClickNoise,
    distance_to_boundary,
    first_click,
    interior_point,
    largest_error_component,
    next_click,
    sample_clicks,
)

SHAPE = (32, 32, 32)


def box(lo, hi, shape=SHAPE) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


@pytest.fixture()
def rng():
    return np.random.default_rng(0)


@pytest.fixture()
def gt():
    """An L-shaped object: its interior-most point is not its centroid."""
    return box((4, 4, 4), (20, 12, 12)) | box((4, 4, 4), (12, 28, 12))


@pytest.mark.parametrize("rule", ["center", "random"])
def test_first_click_is_positive_and_inside_the_object(gt, rng, rule):
    for _ in range(5):
        click = first_click(gt, rng, rule)
        assert click.label == POSITIVE
        assert gt[click.coord]


def test_first_click_on_an_empty_object_is_none(rng):
    assert first_click(np.zeros(SHAPE, bool), rng) is None


def test_interior_point_is_the_distance_transform_maximum(gt, rng):
    distance = ndimage.distance_transform_edt(np.pad(gt, 1))[1:-1, 1:-1, 1:-1]
    coord = interior_point(gt, rng)
    assert distance[coord] == distance.max()
    np.testing.assert_allclose(distance_to_boundary(gt), distance)


def test_interior_point_treats_the_crop_border_as_boundary(rng):
    # a slab touching the d0 = 0 face: deepest in the middle of its thickness, not at the face
    coord = interior_point(box((0, 0, 0), (9, 32, 32)), rng)
    assert coord[0] == 4


@pytest.mark.parametrize("rule", ["center", "random"])
def test_click_on_a_false_negative_is_positive_and_inside_it(gt, rng, rule):
    pred = gt & ~box((4, 16, 4), (12, 28, 12))  # the arm along d1 is missed
    click = next_click(gt, pred, rng, rule)
    assert click.label == POSITIVE
    assert gt[click.coord] and not pred[click.coord]


@pytest.mark.parametrize("rule", ["center", "random"])
def test_click_on_a_false_positive_is_negative_and_inside_it(gt, rng, rule):
    pred = gt | box((22, 20, 20), (30, 30, 30))  # a spurious blob
    click = next_click(gt, pred, rng, rule)
    assert click.label == NEGATIVE
    assert pred[click.coord] and not gt[click.coord]


def test_center_rule_picks_the_largest_error_component(gt, rng):
    small_miss = box((16, 4, 4), (20, 8, 8))
    large_spurious = box((20, 18, 18), (30, 30, 30))
    pred = (gt & ~small_miss) | large_spurious
    component, is_false_negative = largest_error_component(gt, pred)
    assert not is_false_negative and (component == large_spurious).all()
    click = next_click(gt, pred, rng, "center")
    assert click.label == NEGATIVE and large_spurious[click.coord]
    assert distance_to_boundary(large_spurious)[click.coord] == distance_to_boundary(large_spurious).max()


def test_no_error_means_no_click(gt, rng):
    assert next_click(gt, gt.copy(), rng, "center") is None
    assert next_click(gt, gt.copy(), rng, "random") is None


def test_jitter_keeps_the_label_and_stays_in_the_volume(rng):
    corner = box((0, 0, 0), (3, 3, 3))
    for _ in range(20):
        click = first_click(corner, rng, "center", ClickNoise(jitter_voxels=5.0))
        assert click.label == POSITIVE
        assert all(0 <= c < s for c, s in zip(click.coord, SHAPE))


def test_wrong_side_click_lands_just_outside_its_region(gt, rng):
    shell = ndimage.binary_dilation(gt, np.ones((3, 3, 3), bool)) & ~gt
    click = first_click(gt, rng, "center", ClickNoise(wrong_side_probability=1.0))
    assert click.label == POSITIVE
    assert shell[click.coord]


@pytest.mark.parametrize("rule", ["center", "random"])
def test_clicks_are_deterministic_given_the_seed(gt, rule):
    pred = box((4, 4, 4), (12, 12, 12))
    noise = ClickNoise(jitter_voxels=1.0, wrong_side_probability=0.3)
    runs = []
    for _ in range(2):
        rng = np.random.default_rng(42)
        runs.append([next_click(gt, pred, rng, rule, noise) for _ in range(10)])
    assert runs[0] == runs[1]
    assert len({click.coord for click in runs[0]}) > 1  # and the generator does vary them


# -------------------------------------------------------------------------------------- batched torch helper


def batch(*volumes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(volumes))[:, None]


@pytest.mark.parametrize("rule", ["center", "random", "deepest"])
def test_batched_clicks_follow_the_rules(gt, rng, rule):
    config = ClickConfig(first_click=rule, next_click=rule)
    gt_masks = batch(gt, gt, gt)
    pred_masks = batch(gt & ~box((4, 16, 4), (12, 28, 12)), gt | box((22, 20, 20), (30, 30, 30)), gt)

    coords, labels = sample_clicks(gt_masks, None, rng, config)
    assert coords.shape == (3, 1, 3) and coords.dtype == torch.float32
    assert labels.shape == (3, 1) and labels.dtype == torch.int64
    assert (labels == POSITIVE).all()
    assert all(gt[tuple(int(c) for c in coords[i, 0])] for i in range(3))

    coords, labels = sample_clicks(gt_masks, pred_masks, rng, config)
    assert labels[:, 0].tolist() == [POSITIVE, NEGATIVE, PADDING]
    false_negative = gt & ~pred_masks[0, 0].numpy()
    false_positive = pred_masks[1, 0].numpy() & ~gt
    assert false_negative[tuple(int(c) for c in coords[0, 0])]
    assert false_positive[tuple(int(c) for c in coords[1, 0])]


def test_batched_random_clicks_are_deterministic_and_noisy_clicks_stay_inside(gt):
    config = ClickConfig("random", "random", ClickNoise(jitter_voxels=3.0, wrong_side_probability=0.5))
    gt_masks = batch(gt, box((0, 0, 0), (2, 2, 2)))
    draws = [sample_clicks(gt_masks, None, np.random.default_rng(7), config) for _ in range(2)]
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    coords = draws[0][0]
    assert (coords >= 0).all() and (coords <= 31).all()


def test_batched_deepest_click_is_deep_inside_the_object_and_its_errors(gt, rng):
    """The device rule approximates "center": its click is at least as deep as the cell-rounded maximum."""
    config = ClickConfig("deepest", "deepest")
    coords, _ = sample_clicks(batch(gt), None, rng, config)
    depth = distance_to_boundary(gt)
    assert depth[tuple(int(c) for c in coords[0, 0])] >= depth.max() - 2
    thick_miss = box((4, 4, 4), (20, 12, 12))  # the L's long arm is missed; its short arm is found
    coords, labels = sample_clicks(batch(gt), batch(gt & ~thick_miss), rng, config)
    assert labels[0, 0] == POSITIVE
    miss_depth = distance_to_boundary(thick_miss)
    assert miss_depth[tuple(int(c) for c in coords[0, 0])] >= miss_depth.max() - 2


def test_the_deepest_rule_is_refused_where_clicks_are_placed_one_volume_at_a_time(gt, rng):
    with pytest.raises(ValueError, match="batches only"):
        first_click(gt, rng, "deepest")
