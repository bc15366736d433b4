"""The GPU synthesiser (lib.training.synthesis), run on the CPU at small sizes, and the region-growing baseline
(lib.evaluation.region_growing) on a real sample image."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import build_training_cache
from clicking import dice
from lib.clicks.simulator import Click, first_click, next_click
from lib.evaluation.region_growing import RegionGrowingSession
from lib.imaging import load_volume, normalise_intensity
from lib.training.synthesis import (
    CachedVolume,
    SynthesisConfig,
    Synthesiser,
    TrainingCache,
    generation_classes,
    low_resolution,
    quantile_edges,
)

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
HELD_OUT = 3  # the label index no target may contain


def _label_map() -> np.ndarray:
    """uint8 [40, 40, 40]: a slab of label 1 and of label 2 (touching), a ball of HELD_OUT inside label 1, and
    label 4 in two separate blocks (two components)."""
    labels = np.zeros((40, 40, 40), dtype=np.uint8)
    labels[4:36, 4:36, 4:20] = 1
    labels[4:36, 4:36, 20:36] = 2
    grid = np.stack(np.meshgrid(*[np.arange(40)] * 3, indexing="ij"), -1)
    labels[np.linalg.norm(grid - [20, 20, 12], axis=-1) < 5] = HELD_OUT
    labels[6:12, 6:12, 24:30] = 4
    labels[28:34, 28:34, 24:30] = 4
    return labels


def _image(labels: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(40 + 50 * labels + rng.normal(0, 5, labels.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def cache() -> TrainingCache:
    labels = _label_map()
    return TrainingCache(
        [
            CachedVolume("map", labels, held_out_indices=(HELD_OUT,)),
            CachedVolume("pair", labels, image=_image(labels), held_out_indices=(HELD_OUT,)),
        ]
    )


def _config(**overrides) -> SynthesisConfig:
    settings = dict(size=SIZE, min_target_voxels=10, deformation_cells=4, pseudo_growth_steps=8)
    return SynthesisConfig(**{**settings, **overrides})


def _synthesiser(cache: TrainingCache, seed: int = 0, **overrides) -> Synthesiser:
    return Synthesiser(cache, _config(**overrides), torch.Generator().manual_seed(seed))


def test_targets_are_never_empty_and_never_contain_a_held_out_class(cache):
    synthesiser = _synthesiser(cache, mode_weights=(1.0, 1.0, 0.0))
    seen_kinds = set()
    for _ in range(6):
        images, targets, names, labels = synthesiser.next_batch(4, return_labels=True)
        assert images.shape == targets.shape == labels.shape == (4, 1, SIZE, SIZE, SIZE)
        assert targets.dtype == torch.bool
        assert (targets.flatten(1).sum(1) >= 10).all()
        assert not (targets & (labels == HELD_OUT)).any(), names
        assert not (targets & (labels == 0)).any(), "background is never a target"
        seen_kinds |= {name.split(":")[1].split()[0] for name in names}
    assert seen_kinds == {"label", "union", "component"}


def test_deformation_keeps_labels_as_labels(cache):
    _, _, _, labels = _synthesiser(cache, seed=3, mode_weights=(1.0, 0.0, 0.0)).next_batch(4, return_labels=True)
    assert set(labels.unique().tolist()) <= {0, 1, 2, HELD_OUT, 4}
    assert len(labels.unique()) >= 3  # the crops are of the label map, not of its padding


def test_a_union_target_is_touching_labels_and_a_component_one_part(cache):
    # at most 2x magnified, one 6-voxel block stays under 20 voxels across while the two blocks' span does not
    synthesiser = _synthesiser(
        cache, seed=5, mode_weights=(1.0, 0.0, 0.0), target_weights=(0.0, 1.0, 1.0), magnification_range=(1.0, 2.0)
    )
    unions = components = 0
    for _ in range(4):
        _, targets, names, labels = synthesiser.next_batch(4, return_labels=True)
        for target, name, label in zip(targets, names, labels):
            inside = set(label[target].unique().tolist())
            if name.split(":")[1].startswith("union"):
                unions += 1
                named = {int(v) for v in name.split()[-1].split("+")}
                assert inside <= named and named <= {1, 2, 4}  # 1 touches 2, 2 touches 4; never 3
            else:
                components += 1
                assert inside == {4}  # the only label with two parts
                # one part: every target voxel is in one of the blocks, which lie far apart
                coords = target[0].nonzero().float()
                assert (coords.max(0).values - coords.min(0).values).max() < 20
    assert unions and components


def test_images_are_normalised_like_real_images(cache):
    images, _, _ = _synthesiser(cache, seed=1, mode_weights=(1.0, 0.0, 0.0)).next_batch(4)
    for image in images:
        # normalise_intensity is idempotent: a second pass leaves what inference would see unchanged
        torch.testing.assert_close(normalise_intensity(image), image, atol=1e-4, rtol=1e-4)
        foreground = image[image > image.mean()]
        assert abs(float(foreground.mean())) < 1e-3 and abs(float(foreground.std()) - 1) < 1e-3


def test_real_pairs_keep_the_image_and_pseudo_objects_follow_it(cache):
    # unmagnified: a 2x crop of the toy image can be all flat background, where a pseudo-object is as dark as
    # what surrounds it
    synthesiser = _synthesiser(cache, seed=2, mode_weights=(0.0, 1.0, 1.0), magnification_range=(1.0, 1.0))
    images, targets, names = synthesiser.next_batch(6)
    assert {name.split(":")[0] for name in names} == {"pair"}
    assert any("pseudo-object" in name for name in names) and any("pseudo-object" not in name for name in names)
    for image, target in zip(images, targets):
        # the real image's labels are bright and flat: a target is brighter on average than what surrounds it
        assert float(image[target].mean()) != pytest.approx(float(image[~target].mean()), abs=0.1)


def test_magnification_draws_a_structure_larger_in_the_crop(cache):
    """A crop magnified 2x shows a component 2x as wide, so about 8x the voxels: the finer voxels serving uses."""
    still = dict(
        mode_weights=(1.0, 0.0, 0.0),
        target_weights=(0.0, 0.0, 1.0),
        scale_range=0.0,
        rotation_degrees=0.0,
        shear_range=0.0,
        deformation_std_max=0.0,
        centre_jitter=0.0,
    )
    sizes = {}
    for magnification in (1.0, 2.0):
        synthesiser = _synthesiser(cache, seed=4, magnification_range=(magnification, magnification), **still)
        _, targets, _ = synthesiser.next_batch(4)
        sizes[magnification] = targets.flatten(1).sum(1).float()  # each a 6^3 block of label 4, whole in the crop
    assert torch.allclose(sizes[2.0] / sizes[1.0], torch.full((4,), 8.0), rtol=0.35)


def test_a_fixed_seed_gives_the_same_batch(cache):
    first = _synthesiser(cache, seed=7).next_batch(3)
    second = _synthesiser(cache, seed=7).next_batch(3)
    other = _synthesiser(cache, seed=8).next_batch(3)
    torch.testing.assert_close(first[0], second[0])
    assert torch.equal(first[1], second[1]) and first[2] == second[2]
    assert not torch.equal(first[0], other[0])


def test_pseudo_object_levels_are_torch_quantiles_of_each_field_of_view():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn((3, 500), generator=generator)
    inside = torch.rand((3, 500), generator=generator) < 0.6
    levels = [3, 8, 5]
    edges = quantile_edges(values, inside, levels)
    assert edges.shape == (3, 7)
    for row, count in enumerate(levels):
        expected = torch.quantile(values[row][inside[row]], torch.arange(1, count) / count)
        torch.testing.assert_close(edges[row, : count - 1], expected)
        assert torch.all(edges[row, count - 1 :] == values[row][inside[row]].max())  # unused: nothing above


def test_generation_classes_share_an_intensity_only_between_touching_labels():
    neighbours = {1: [2], 2: [1, 4], 4: [2]}
    classes = generation_classes(neighbours, 4, 1.0, torch.Generator().manual_seed(0))
    assert classes[0] == 0 and classes[HELD_OUT] == HELD_OUT  # no neighbour: its own intensity
    assert set(classes[[1, 2, 4]].tolist()) <= {1, 2, 4}
    assert torch.equal(classes[classes], classes)  # resolved: one intensity per group


def test_low_resolution_is_flat_along_a_thick_slice_axis():
    in_plane = torch.rand(1, 1, 32, 32, 1)
    image = in_plane + torch.rand(1, 1, 1, 1, 32)  # detail in the slice plane and across slices
    thick = low_resolution(image, (1.0, 1.0, 4.0))
    assert thick.shape == image.shape
    assert thick.diff(dim=-1).abs().mean() < 0.5 * image.diff(dim=-1).abs().mean()  # across slices: averaged
    torch.testing.assert_close(thick.diff(dim=2), image.diff(dim=2))  # within a slice: untouched


def _shared_data_like(root: Path) -> Path:
    """A folder laid out as ../shared/data (manifest.json and its files, tiny volumes): every held-out subject of
    build_training_cache, one training subject with FreeSurfer's amygdala (18) beside a hippocampus (17), and one
    map of a set whose licence does not allow shipped weights."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])

    def label_map(relative: str, values: tuple[int, ...]) -> str:
        labels = np.zeros((12, 12, 12), dtype=np.int16)
        for n, value in enumerate(values):
            labels[2 + 3 * n : 4 + 3 * n, 3:9, 3:9] = value
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(labels, affine), root / relative)
        return relative

    source = {"repo": "test", "path": "generated", "commit": "0" * 40}
    manifest = []
    for relative in build_training_cache.HELD_OUT_FILES:
        set_name = relative.split("/")[1]
        if relative.startswith("pairs/"):
            label = label_map(relative.replace("_image", "_label"), (1,))
            image = label_map(relative, (50,))
            manifest.append(
                {
                    "set": set_name,
                    "kind": "image_label_pair",
                    "licence": "MIT",
                    "label": label,
                    "label_sources": [],
                    "image": {"file": image, "source": source},
                }
            )
        else:
            manifest.append(
                {
                    "set": set_name,
                    "kind": "label_map",
                    "licence": "Apache-2.0",
                    "file": label_map(relative, (2, 3)),
                    "source": source,
                }
            )
    for set_name, licence, relative in (
        ("synthseg", "Apache-2.0", "label_maps/synthseg/subject01_seg.nii.gz"),
        ("synthsr", "unknown", "label_maps/synthsr/subject01.nii.gz"),
    ):
        file = label_map(relative, (17, 18, 2))
        manifest.append({"set": set_name, "kind": "label_map", "licence": licence, "file": file, "source": source})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_the_training_cache_keeps_held_out_subjects_classes_and_unknown_licences_out_of_training(tmp_path):
    cache_file = tmp_path / "training_cache.npz"
    build_training_cache.main(["--data", str(_shared_data_like(tmp_path / "data")), "--out", str(cache_file)])
    train = TrainingCache.load(cache_file, split="train")
    validation = TrainingCache.load(cache_file, split="validation")
    held_out_subjects = {Path(f).name.split(".")[0] for f in build_training_cache.HELD_OUT_FILES}
    assert not {v.name.split(":")[1] for v in train.volumes} & held_out_subjects
    assert {v.name.split(":")[1] for v in validation.volumes} >= held_out_subjects
    # the synthsr map (licence unknown) validates, never trains
    assert not any(v.info["set"] == "synthsr" for v in train.volumes)
    assert any(v.info["set"] == "synthsr" for v in validation.volumes)
    # the amygdala may be painted into the image but is never a target; the hippocampus beside it is one
    (subject,) = [v for v in train.volumes if v.info["set"] == "synthseg"]
    assert subject.info["values"] == [2, 17, 18]
    assert subject.held_out == {3}
    # the sample-data pairs (real images) train
    assert sum(v.image is not None for v in train.volumes if v.info["set"] == "sample_data") == 2


# ------------------------------------------------------------------------------------------ region growing


@pytest.fixture(scope="module")
def brain1():
    image = load_volume(str(REPO / "sample-data" / "brain1.nrrd"))
    truth = np.asarray(load_volume(str(REPO / "sample-data" / "labels" / "final" / "brain1.nrrd"))[0]) == 1
    return image, truth


def test_region_growing_segments_the_brain1_lesion_within_ten_clicks(brain1):
    # the lesion's surroundings share its intensity band: the grower leaks into them until negative clicks cut,
    # and a new positive click can leak again (measured, centre clicks: Dice 0.01, 0.04, 0.06, 0.05, 0.11, 0.32,
    # 0.44, 0.45, 0.43, 0.27): the floor is not monotone, so the test asks for its best within ten clicks
    image, truth = brain1
    session = RegionGrowingSession.of(image)
    rng = np.random.default_rng(0)
    session.add_click(first_click(truth, rng, "center"))
    dice_per_click = [dice(session.mask, truth)]
    for _ in range(9):
        click = next_click(truth, session.mask, rng, "center")
        if click is None:
            break
        session.add_click(click)
        dice_per_click.append(dice(session.mask, truth))
    assert session.mask.shape == truth.shape and session.mask.dtype == bool
    assert max(dice_per_click) > 0.3, dice_per_click


def test_a_negative_click_removes_the_voxels_around_it(brain1):
    image, truth = brain1
    session = RegionGrowingSession.of(image)
    centre = first_click(truth, np.random.default_rng(0), "center")
    session.add_click(centre)
    before = session.mask.copy()
    inside = np.argwhere(before & truth)
    far = tuple(int(v) for v in inside[np.argmax(np.abs(inside - centre.coord).sum(1))])  # far from the seed
    session.add_click(Click(far, 0))
    assert not session.mask[far]
    box = tuple(slice(max(c - 1, 0), c + 2) for c in far)
    assert not session.mask[box].any()
    assert session.mask[centre.coord] and session.mask.sum() < before.sum()
