"""Synthetic training volumes: a target object (blob, shell or tube) among distractors, with varied contrast,
texture, partial-volume edges, noise and a bias field; normalised by the same function as real images.

Why synthetic data: labelled data is scarce, and what an interactive model must learn first, where an object's
boundary is given a click inside it, does not depend on anatomy.
Distractors of random (sometimes equal) contrast make the target ambiguous without clicks, as in real images.

Every shape is an implicit function f (negative inside, about a distance in voxels), evaluated on a grid
`field_stride` times coarser than the volume and upsampled trilinearly: f is smooth, so this loses little, and it
makes generation 8x cheaper. The target mask is f < 0 at full resolution; the image blends intensities with
sigmoid(-f / edge_softness), a partial-volume edge. The volumes' noise comes from a torch.Generator on the
device, every scalar and small tensor from a host generator.

On a GPU a sample never waits for it: host values reach the device through pinned memory, a target too small is
replaced by a sphere with `torch.where` instead of being drawn again after a look at its size, and the
normalisation is a masked reduction (`lib.imaging.normalise_batch`). So the training loop draws its shapes while
the GPU still runs the step before (lib.training.data_sources); each used to wait for it about 25 times
(13-38 by the code, with its distractors), ~6 ms a shape with the GPU idle.

Held-out synthetic cases for `lib.evaluation.evaluate` (volumes drawn from a seed no training run uses):

    cd apps/mais && python -m lib.training.synthetic --out /tmp/synthetic_cases --count 20 --seed 987654
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from lib.devices import copy_to_device
from lib.imaging import CROP_SIZE, MODEL_SPACING_MM, normalise_batch

# The label name of every synthetic target, in the label map `write_cases` writes beside the cases.
SYNTHETIC_LABEL = "object"


@dataclass(frozen=True)
class SyntheticConfig:
    """Ranges the generator draws from; lengths in voxels of the output volume."""

    size: int = CROP_SIZE
    field_stride: int = 2  # implicit functions are evaluated on a (size / stride)^3 grid, then upsampled
    radius_range: tuple[float, float] = (3.0, 34.0)  # blob / shell radius: lesion to organ
    tube_radius_range: tuple[float, float] = (1.5, 6.0)
    shape_weights: tuple[float, float, float] = (0.55, 0.15, 0.30)  # blob, shell, tube (for target and distractors)
    max_distractors: int = 5
    body_probability: float = 0.6  # zero background outside an ellipsoidal body, as in skull-stripped MR
    contrast_range: tuple[float, float] = (0.15, 1.5)  # |object - surroundings| / surroundings intensity
    noise_range: tuple[float, float] = (0.01, 0.2)  # Gaussian noise std, relative to the tissue intensity
    texture_range: tuple[float, float] = (0.0, 0.25)  # smooth intensity variation inside each object
    bias_range: tuple[float, float] = (0.0, 0.5)  # amplitude of the log bias field
    edge_softness_range: tuple[float, float] = (0.3, 1.2)  # voxels
    # A volume seen at a lower resolution and interpolated back, as thick slices are, and as a small image is at
    # the 0.375 mm model space (lib/imaging.py): share of samples, and the factor per coarse axis.
    low_resolution_probability: float = 0.3
    low_resolution_factor_range: tuple[float, float] = (1.5, 5.0)
    min_target_voxels: int = 30

    def __post_init__(self) -> None:
        if self.size % self.field_stride:
            raise ValueError(f"size {self.size} must be a multiple of field_stride {self.field_stride}")


def synthetic_sample(
    generator: torch.Generator, config: SyntheticConfig = SyntheticConfig(), host: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One sample: image float32 [1, S, S, S] normalised, mask bool [1, S, S, S] of the target (at least
    `min_target_voxels`), on `generator`'s device. host: the generator of its scalars (a CPU one); None seeds one
    from `generator`, which waits for a GPU generator, so a caller on the GPU passes its own."""
    draw = _Draw(generator, host)
    grid = _field_grid(config, generator.device)
    image = 1.0 + draw.uniform(0.0, 0.3) * _smooth_noise(draw, config.size, cells=4)  # tissue, intensity ~1

    for _ in range(int(draw.integer(0, config.max_distractors + 1))):
        field = _random_shape(draw, grid, config, centre_margin=0.0)
        image = _paint(image, _upsample(field, config), draw, config)

    target_field = _upsample(_target_shape(draw, grid, config), config)
    image = _paint(image, target_field, draw, config)
    mask = target_field < 0

    if draw.uniform() < config.body_probability:
        body = _upsample(_blob(draw, grid, draw.uniform(0.42, 0.5) * config.size, 0.45, config), config)
        inside = body < 0
        image = image * inside
        mask = mask & inside

    image = image * torch.exp(draw.uniform(*config.bias_range) * _smooth_noise(draw, config.size, cells=3))
    image = image + draw.uniform(*config.noise_range) * draw.noise_volume((config.size,) * 3)
    if draw.uniform() < config.low_resolution_probability:
        image = _low_resolution(image, draw, config)
    return normalise_batch(image[None], torch.ones_like(image, dtype=torch.bool)[None]), mask[None]


def synthetic_stream(
    seed: int, workers: int, config: SyntheticConfig = SyntheticConfig()
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless synthetic samples (as `synthetic_sample`, on the host) made by `workers` background processes.

    Why: a sample is hundreds of small operations, so on a GPU its generation is bound by one CPU core and kernel
    launches, and it starved the training loop (4 H100s under DDP trained no faster than 2). Host processes make
    samples in parallel while the GPU trains. The order is fixed by `seed` and `workers` (a DataLoader takes its
    workers' samples in turn); a resumed run draws new volumes. Workers are spawned, not forked: a forked copy of
    a process that has started CUDA aborts when it exits.
    """
    loader = DataLoader(
        _SyntheticSamples(seed, config),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )
    return iter(loader)


class _SyntheticSamples(IterableDataset):
    def __init__(self, seed: int, config: SyntheticConfig) -> None:
        self.seed, self.config = seed, config

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        worker = get_worker_info()
        torch.set_num_threads(1)  # one core per worker: the parallelism is across workers
        generator = torch.Generator().manual_seed(self.seed * 1000 + (worker.id if worker else 0))
        while True:
            yield synthetic_sample(generator, self.config)


# --------------------------------------------------------------------------------------------------- shapes


def _target_shape(draw: _Draw, grid: Tensor, config: SyntheticConfig) -> Tensor:
    """The target's implicit function on the field grid, with at least `min_target_voxels` voxels inside: a
    random shape, or where that has too few (under 1 in 300 with the default ranges: a thin shell, a blob
    squeezed by its bumps) a sphere large enough, chosen on the device without looking at the size."""
    field = _random_shape(draw, grid, config, centre_margin=0.2)
    # a sphere of twice this volume at field-grid resolution holds min_target_voxels output voxels with margin
    radius = max(config.radius_range[0], (3 * 2 * config.min_target_voxels / (4 * math.pi)) ** (1 / 3))
    sphere = (grid - _random_centre(draw, config.size, 0.3, grid.device)).norm(dim=-1) - radius
    enough = (field < 0).sum() * config.field_stride**3 >= config.min_target_voxels
    return torch.where(enough, field, sphere)


def _random_shape(draw: _Draw, grid: Tensor, config: SyntheticConfig, centre_margin: float) -> Tensor:
    """A blob, shell or tube (by `shape_weights`) centred at least `centre_margin` * size from the border."""
    kind = draw.choice(config.shape_weights)
    if kind == 2:
        return _tube(draw, grid, config, centre_margin)
    radius = math.exp(draw.uniform(*map(math.log, config.radius_range)))  # log-uniform: as many small as large
    outer = _blob(draw, grid, radius, centre_margin, config)
    if kind == 0:
        return outer
    thickness = draw.uniform(0.2, 0.5) * radius  # a shell, like cortex around white matter
    return torch.maximum(outer, -(outer + thickness))


def _blob(draw: _Draw, grid: Tensor, radius: float, centre_margin: float, config: SyntheticConfig) -> Tensor:
    """A randomly rotated, stretched and bumpy ellipsoid of mean radius `radius` (voxels). grid [F, F, F, 3]."""
    centre = _random_centre(draw, config.size, centre_margin, grid.device)
    rotation = draw.to_device(torch.linalg.qr(draw.host_normal((3, 3)))[0])  # a 3x3 QR: cheaper on the host
    axes = radius * torch.exp(draw.normal((3,)) * 0.3)
    local = ((grid - centre) @ rotation) / axes  # unit ball coordinates
    bumps = draw.uniform(0.0, 0.35) * _noise_at(draw, local / 2.0, cells=5)
    return (local.norm(dim=-1) - 1.0 + bumps) * axes.mean()


def _tube(draw: _Draw, grid: Tensor, config: SyntheticConfig, centre_margin: float) -> Tensor:
    """A smooth random curve with a varying radius: distance to its axis minus the local radius. grid [F,F,F,3]."""
    segments = 48
    step = draw.uniform(0.8, 2.5)
    # the walk is 48 tiny steps: built on the host, then moved, rather than ~150 kernel launches on a GPU
    directions = [F.normalize(draw.host_normal((3,)), dim=0)]
    for _ in range(segments - 1):
        directions.append(F.normalize(directions[-1] + 0.25 * draw.host_normal((3,)), dim=0))  # momentum: smooth turns
    path = draw.to_device(torch.cumsum(torch.stack(directions) * step, dim=0))
    path = path - path.mean(dim=0) + _random_centre(draw, config.size, centre_margin, grid.device)
    low, high = config.tube_radius_range
    radii = low + (high - low) * torch.sigmoid(draw.normal((1,)) + 0.5 * draw.normal((segments,)).cumsum(0) / 3)
    flat = grid.reshape(-1, 3)
    distance = (torch.cdist(flat, path) - radii).amin(dim=1)
    return distance.reshape(grid.shape[:3])


def _random_centre(draw: _Draw, size: int, margin: float, device: torch.device) -> Tensor:
    return copy_to_device(torch.tensor([draw.uniform(margin, 1.0 - margin) * (size - 1) for _ in range(3)]), device)


def _paint(image: Tensor, field: Tensor, draw: _Draw, config: SyntheticConfig) -> Tensor:
    """Blend an object with implicit function `field` [S, S, S] into `image` [S, S, S] with a random contrast
    against the intensity it covers (brighter or darker), its own texture and a partial-volume edge."""
    inside = (field < 0).float()
    # mean intensity under the object without boolean indexing, which would wait for the GPU
    surroundings = (image * inside).sum() / inside.sum().clamp_min(1.0)
    sign = 1.0 if draw.uniform() < 0.5 else -1.0
    level = (surroundings * (1.0 + sign * draw.uniform(*config.contrast_range))).clamp_min(0.05)
    texture = 1.0 + draw.uniform(*config.texture_range) * _smooth_noise(draw, config.size, cells=8)
    occupancy = torch.sigmoid(-field / draw.uniform(*config.edge_softness_range))
    return image * (1.0 - occupancy) + level * texture * occupancy


def _low_resolution(image: Tensor, draw: _Draw, config: SyntheticConfig) -> Tensor:
    """image [S, S, S] averaged down along one axis (thick slices) or all three, then trilinearly back up."""
    factor = draw.uniform(*config.low_resolution_factor_range)
    axes = range(3) if draw.uniform() < 0.5 else [draw.integer(0, 3)]
    coarse = [max(2, round(config.size / factor)) if axis in axes else config.size for axis in range(3)]
    low = F.interpolate(image[None, None], size=coarse, mode="area")
    return F.interpolate(low, size=(config.size,) * 3, mode="trilinear", align_corners=False)[0, 0]


# ---------------------------------------------------------------------------------------------------- fields


def _field_grid(config: SyntheticConfig, device: torch.device) -> Tensor:
    """Full-resolution voxel coordinates of the coarse field grid's points: [F, F, F, 3], F = size / stride."""
    stride = config.field_stride
    axis = torch.arange(config.size // stride, device=device, dtype=torch.float32) * stride + (stride - 1) / 2
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)


def _upsample(field: Tensor, config: SyntheticConfig) -> Tensor:
    """Coarse field [F, F, F] -> [S, S, S] trilinearly (cell-centred, matching `_field_grid`)."""
    if config.field_stride == 1:
        return field
    return F.interpolate(field[None, None], size=(config.size,) * 3, mode="trilinear", align_corners=False)[0, 0]


def _smooth_noise(draw: _Draw, size: int, cells: int) -> Tensor:
    """Smooth random field [size]^3 of about unit amplitude varying over `cells` cells per axis."""
    coarse = draw.normal((1, 1, cells, cells, cells))
    return F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True)[0, 0]


def _noise_at(draw: _Draw, points: Tensor, cells: int) -> Tensor:
    """A smooth random field over [-1, 1]^3 (`cells` per axis) sampled at points [..., 3] -> [...]."""
    coarse = draw.normal((1, 1, cells, cells, cells))
    samples = F.grid_sample(
        coarse, points.reshape(1, 1, 1, -1, 3), mode="bilinear", padding_mode="border", align_corners=True
    )
    return samples.reshape(points.shape[:-1])


class _Draw:
    """Random numbers for one sample: scalars and small tensors from a host generator (no GPU round trip per
    draw), the full-size noise volume from the device generator. Without a host generator given, one is seeded
    from the device one, so the caller's generator alone fixes the sample."""

    def __init__(self, generator: torch.Generator, host: torch.Generator | None = None) -> None:
        self.generator = generator
        self.device = generator.device
        if host is None:
            host = torch.Generator().manual_seed(int(torch.randint(2**62, (), generator=generator, device=self.device)))
        self.host = host

    def uniform(self, low: float = 0.0, high: float = 1.0) -> float:
        return low + (high - low) * float(torch.rand((), generator=self.host))

    def integer(self, low: int, high: int) -> int:
        """Uniform in [low, high)."""
        return int(torch.randint(low, high, (), generator=self.host))

    def choice(self, weights: tuple[float, ...]) -> int:
        return int(torch.multinomial(torch.tensor(weights), 1, generator=self.host))

    def host_normal(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.host)

    def normal(self, shape: tuple[int, ...]) -> Tensor:
        """A small standard normal tensor on the device."""
        return self.to_device(self.host_normal(shape))

    def to_device(self, values: Tensor) -> Tensor:
        """A small host tensor on the device, without waiting for the GPU."""
        return copy_to_device(values, self.device)

    def noise_volume(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device)


# ------------------------------------------------------------------------------------------- evaluation cases


def write_cases(out: Path, count: int, seed: int, config: SyntheticConfig = SyntheticConfig()) -> Path:
    """`count` synthetic samples as NIfTI files in a MONAI Label datastore layout (`out/synthetic_NNN.nii.gz`,
    `out/labels/final/synthetic_NNN.nii.gz`) on 1.5 mm RAS voxels, the model's own space, and the label map
    `out/labels.json` ({SYNTHETIC_LABEL: 1}); returns the label map's path. The images are written normalised:
    `lib.imaging.normalise_intensity`, which the evaluation applies, gives them back unchanged (it is idempotent),
    so the evaluation sees what training saw.
    """
    import nibabel as nib  # only this CLI writes files

    (out / "labels" / "final").mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    affine = np.diag([MODEL_SPACING_MM] * 3 + [1.0])
    for index in range(count):
        image, mask = synthetic_sample(generator, config)
        name = f"synthetic_{index:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image[0].numpy(), affine), out / name)
        nib.save(nib.Nifti1Image(mask[0].numpy().astype(np.uint8), affine), out / "labels" / "final" / name)
    label_map = out / "labels.json"
    label_map.write_text(json.dumps({"background": 0, SYNTHETIC_LABEL: 1}))
    return label_map


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lib.training.synthetic", description=write_cases.__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--count", type=int, default=20)
    # training runs seed their generators with small numbers (seed + 1, or (seed + 1) * 1000 + worker)
    parser.add_argument("--seed", type=int, default=987654)
    args = parser.parse_args(argv)
    print(f"{args.count} cases in {args.out}; label map {write_cases(args.out, args.count, args.seed)}")


if __name__ == "__main__":
    main()
