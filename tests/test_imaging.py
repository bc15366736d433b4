"""Model space on real files (CPU, no model): small images are seen at 0.375 mm, and a zoomed view (the training
crops of small structures) maps clicks in and masks out through the whole file's grid, as the full view does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.imaging import (
    CROP_SIZE,
    DETAIL_SPACING_MM,
    FINE_SPACING_MM,
    MAX_MODEL_VOXELS,
    MODEL_SPACING_MM,
    IntensityNormalisation,
    ModelSpaceImage,
    load_volume,
    normalise_batch,
)
from server import SAMPLE_DATA

CLICK = np.array([[120.0, 140.0, 12.0]])  # original voxel indices of brain1 (0.78 x 0.78 x 6.5 mm, LPS)


@pytest.fixture(scope="module")
def original():
    return load_volume(str(SAMPLE_DATA / "brain1.nrrd"))


@pytest.fixture(scope="module")
def image(original):
    return ModelSpaceImage(original)


@pytest.fixture(scope="module")
def view(image, original):
    return image.zoomed(original, CLICK[0])


@pytest.mark.parametrize(
    ("name", "spacing_mm"),
    [("breast1.nii.gz", FINE_SPACING_MM), ("brain1.nrrd", DETAIL_SPACING_MM), ("lung1.nii.gz", 0.933)],
)
def test_the_model_voxel_is_as_fine_as_the_field_of_view_allows(name, spacing_mm):
    """breast1 is 30 x 80 x 44 mm, under half a 192 mm window along every axis: the fine spacing. brain1
    (200 x 200 x 163 mm) gets 0.75 mm; lung1's 29 x 29 x 24 cm would need more than MAX_MODEL_VOXELS at 0.75 mm,
    so its voxel grows until the volume fits."""
    image = ModelSpaceImage.from_file(str(SAMPLE_DATA / name))
    assert image.spacing_mm == spacing_mm
    assert np.allclose(np.abs(np.diag(image.affine.numpy())[:3]), spacing_mm)
    assert np.prod(image.shape) <= MAX_MODEL_VOXELS * 1.01  # the rounding of the voxel and of the grid's faces


def world(affine: torch.Tensor, voxels: np.ndarray) -> np.ndarray:
    return (np.c_[voxels, np.ones(len(voxels))] @ affine.numpy().T)[:, :3]


def test_the_zoomed_view_is_one_fine_window_centred_on_the_click(image, view):
    assert view.spacing_mm == FINE_SPACING_MM == MODEL_SPACING_MM / 4
    assert np.allclose(np.abs(np.diag(view.affine.numpy())[:3]), FINE_SPACING_MM)
    point = view.to_model_voxels(CLICK)
    # the window around the click (48 mm), plus at most the original voxels the interpolation needs at its faces
    original_spacing = np.abs(np.diag(image.original_affine.numpy())[:3])  # brain1's axes are the RAS axes
    most = CROP_SIZE + 3 * original_spacing / FINE_SPACING_MM
    assert np.all(np.asarray(view.shape) >= CROP_SIZE) and np.all(view.shape <= most), (view.shape, most)
    assert np.all(np.abs(point[0] - np.asarray(view.shape) / 2) < 20), (point, view.shape)
    assert np.allclose(world(view.affine, point), world(image.original_affine, CLICK), atol=1e-3)
    assert view.original_shape == image.original_shape


def test_the_zoomed_view_is_normalised_like_the_whole_image(image, view):
    assert view.intensity is image.intensity
    # the same anatomy at the click: the fine voxel equals the full view's voxel at that world point, within the
    # difference of two linear interpolations of the same file
    fine = view.volume[(0, *np.round(view.to_model_voxels(CLICK)[0]).astype(int))]
    coarse = image.volume[(0, *np.round(image.to_model_voxels(CLICK)[0]).astype(int))]
    assert abs(float(fine) - float(coarse)) < 0.5, (float(fine), float(coarse))
    assert view.pad_value == image.pad_value


def test_a_mask_in_the_zoomed_view_lands_on_the_original_voxels_of_the_same_place(image, view):
    radius_mm = 8.0
    centre = world(image.original_affine, CLICK)[0]
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in view.shape], indexing="ij"), -1).reshape(-1, 3)
    inside = np.linalg.norm(world(view.affine, grid) - centre, axis=1) < radius_mm
    logits = torch.where(torch.from_numpy(inside.reshape(view.shape)), 10.0, -20.0)[None]

    box, mask = view.to_original_grid(logits, np.zeros(3, dtype=int), np.asarray(view.shape))
    on_original = np.zeros(image.original_shape, dtype=bool)
    on_original[box] = mask
    original_grid = np.stack(np.meshgrid(*[np.arange(s) for s in image.original_shape], indexing="ij"), -1)
    expected = np.linalg.norm(world(image.original_affine, original_grid.reshape(-1, 3)) - centre, axis=1) < radius_mm
    expected = expected.reshape(image.original_shape)
    overlap = 2 * (on_original & expected).sum() / (on_original.sum() + expected.sum())
    assert expected.sum() > 100 and overlap > 0.95, (expected.sum(), on_original.sum(), overlap)


def test_a_mask_goes_back_to_an_oblique_grid_as_monai_would_resample_it():
    """The result on the original grid is trilinear resampling with border padding (what MONAI's SpatialResample
    gives), here for a box of a rotated, anisotropic, non-RAS file and smooth logits with a real boundary."""
    from monai.data import MetaTensor
    from monai.transforms import SpatialResample

    rotation = torch.linalg.matrix_exp(torch.tensor([[0.0, -0.3, 0.1], [0.3, 0.0, -0.2], [-0.1, 0.2, 0.0]]))
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = (rotation @ torch.diag(torch.tensor([-0.9, 1.1, 3.0]))).double()
    affine[:3, 3] = torch.tensor([40.0, -25.0, 10.0])
    original = MetaTensor(torch.rand(1, 200, 160, 40), affine=affine)  # 0.75 mm model voxels
    image = ModelSpaceImage(original)
    centre = np.asarray(image.shape) / 2
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in image.shape], indexing="ij"), -1)
    logits = torch.from_numpy(15.0 - np.linalg.norm(grid - centre, axis=-1)).float()[None]  # a ball, radius 15
    lo, hi = np.maximum(centre.astype(int) - 25, 0), np.minimum(centre.astype(int) + 25, image.shape)

    box, mask = image.to_original_grid(logits, lo, hi)

    first = np.array([b.start for b in box])
    src_lo, src_hi = np.maximum(lo - 1, 0), np.minimum(hi + 1, image.shape)
    source_affine, box_affine = image.affine.clone(), image.original_affine.clone()
    source_affine[:3, 3] = (image.affine @ torch.tensor([*src_lo, 1.0], dtype=torch.float64))[:3]
    box_affine[:3, 3] = (image.original_affine @ torch.tensor([*first, 1.0], dtype=torch.float64))[:3]
    source = logits[(slice(None), *(slice(a, b) for a, b in zip(src_lo, src_hi)))]
    expected = (
        SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float32)(
            MetaTensor(source, affine=source_affine.float()), dst_affine=box_affine.float(), spatial_size=mask.shape
        )[0].numpy()
        > 0
    )
    assert expected.sum() > 1000 and (~expected).sum() > 1000
    assert (mask != expected).sum() <= expected.sum() * 1e-4, ((mask != expected).sum(), expected.sum())


def test_a_batch_is_normalised_as_each_image_alone_inside_its_field_of_view():
    """normalise_batch (the training synthesis's, without boolean indexing) gives what IntensityNormalisation of
    each image's field of view gives, the outside padded with the normalised minimum as a crop is: for an MR
    image, a CT image (clamped), an image with almost no voxel above its mean (the fallback to every voxel) and
    one seen whole."""
    generator = torch.Generator().manual_seed(0)
    volumes = torch.rand((4, 1, 12, 12, 12), generator=generator) * 300
    volumes[1] = volumes[1] * 10 - 2000  # CT-like: air below -500 HU, bone above 1000 HU
    volumes[2] = 5.0
    volumes[2, 0, 0, 0, 0] = 9.0  # one voxel above the mean
    inside = torch.zeros(volumes.shape, dtype=torch.bool)
    inside[:3, :, 2:10, 1:11, 3:9] = True
    inside[3] = True
    batch = normalise_batch(volumes, inside)
    for volume, fov, normalised in zip(volumes, inside, batch):
        expected = IntensityNormalisation.of(volume[fov])(volume)
        torch.testing.assert_close(normalised[fov], expected[fov], atol=1e-4, rtol=1e-4)
        assert torch.all(normalised[~fov] == expected[fov].min())
