"""Domain-randomised training crops drawn on the GPU from label maps (SynthSeg's idea) and real image/label pairs.

A sample is one CROP_SIZE^3 crop of model space (0.375-1.5 mm voxels, as served) with a click target:
- geometry: random flip, affine (scale, rotation, shear, magnification of the cache's 1.5 mm) and a smooth random
  deformation (a coarse random displacement field, upsampled), all in ONE sampling grid, so a label map is
  resampled once (nearest: labels stay labels) and a real image with the same grid (linear);
- intensity (label maps): every label a Gaussian of random mean and std, MR-like (0-255, with bias field and
  gamma) or CT-like (Hounsfield units, air around), with labels sometimes sharing their neighbour's intensity
  (generation classes: no edge between them, so only the clicks can say where the target ends); then partial
  volume blur, a lower resolution (thick slices along one axis or coarse voxels: averaged down and interpolated
  back), noise, and `normalise_intensity`, the normalisation every real image gets at inference;
- target: one label, a union of 2-3 touching labels, or one connected component of one label; on a real image
  without labels (pseudo-object), the intensity-connected region under a seed. Held-out structure classes of the
  cache are never (part of) a label target (a pseudo-object follows intensities, not labels, and may overlap
  one); targets under `min_target_voxels` or filling almost the whole crop are drawn again.

Randomness: one torch.Generator (the caller's, on the device) fixes every sample; scalar choices come from a host
generator seeded once from it. A batch waits for the GPU once, at the target size check, after the drawing: host
values reach the device through pinned memory without waiting (`lib.devices.copy_to_device`), and the
normalisation and the pseudo-objects' quantiles are masked reductions, not boolean indexing. So the training loop
can draw the next batch while the GPU still runs the step before.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor

from lib.devices import copy_to_device
from lib.imaging import CROP_SIZE, MODEL_SPACING_MM, normalise_batch

MODES = ("label_map", "real_pair", "pseudo_object")
TARGET_KINDS = ("label", "union", "component")
MAX_LABELS = 256  # label indices are uint8
# Member voxels kept per connected component to centre crops on (at cache load).
CENTRE_SAMPLES = 16


@dataclass(frozen=True)
class SynthesisConfig:
    """Ranges the synthesiser draws from; lengths in output voxels unless named otherwise."""

    size: int = CROP_SIZE
    mode_weights: tuple[float, float, float] = (0.75, 0.15, 0.10)  # label map, real pair, pseudo-object
    target_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)  # label, union of neighbours, one component
    # geometry (SynthSeg's defaults: scaling +-0.2, rotation +-15 degrees, shearing +-0.012)
    flip_probability: float = 0.5  # per axis
    scale_range: float = 0.2
    # Crops are drawn this much finer than the cache's 1.5 mm voxels (log-uniform): serving resamples most images
    # to 0.75-1.5 mm and small ones to 0.375 mm (lib.imaging.model_spacing_mm), where a structure spans up to four
    # times as many voxels (runs 7-9 drew 1-2x and missed the small images' scale: breast1's first click fell).
    magnification_range: tuple[float, float] = (1.0, 4.0)
    rotation_degrees: float = 15.0
    shear_range: float = 0.012
    deformation_cells: int = 8  # coarse grid of the displacement field, per axis
    deformation_std_max: float = 2.5  # voxels (SynthSeg: 4 mm at 1 mm)
    centre_jitter: float = 0.25  # the target centre lands up to this fraction of the crop off its centre
    # intensity
    ct_probability: float = 0.25
    share_probability: float = 0.5  # a sample groups labels into generation classes ...
    share_fraction: float = 0.3  # ... and this share of its labels takes a touching neighbour's intensity
    mr_mean_range: tuple[float, float] = (0.0, 255.0)
    mr_std_range: tuple[float, float] = (1.0, 25.0)
    bias_std_max: float = 0.5  # std of the log bias field
    bias_cells: int = 4
    partial_volume_sigma_max: float = 1.0  # Gaussian blur before noise and resolution loss
    low_resolution_probability: float = 0.5
    thick_slice_factor_range: tuple[float, float] = (1.5, 5.0)  # one axis: up to 7.5 mm slices
    coarse_voxel_factor_range: tuple[float, float] = (1.0, 2.7)  # all axes: up to 4 mm voxels
    noise_std_max: float = 0.06  # relative to the sample's intensity range
    gamma_std: float = 0.25  # log of the gamma exponent (MR only)
    # pseudo-objects on real images
    pseudo_levels_range: tuple[int, int] = (3, 8)
    pseudo_growth_steps: int = 24  # dilation steps at half resolution: the region's reach from its seed
    # targets
    min_target_voxels: int = math.ceil(100.0 / MODEL_SPACING_MM**3)  # 0.1 ml
    max_target_fraction: float = 0.8
    max_attempts: int = 20

    def __post_init__(self) -> None:
        if self.size % 2:
            raise ValueError(f"size must be even, got {self.size}")
        low, high = self.magnification_range
        if not 0 < low <= high:
            raise ValueError(f"magnification_range must be 0 < low <= high, got {self.magnification_range}")
        for name in ("mode_weights", "target_weights"):
            weights = getattr(self, name)
            if len(weights) != 3 or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(f"{name} must be 3 non-negative weights, got {weights}")


@dataclass
class CachedVolume:
    """One label map of the cache in model space. labels uint8 [X, Y, Z] (0 background, 1..N); image uint8
    [X, Y, Z] or None; held_out_indices: label indices never to be a target; name: what the source names say."""

    name: str
    labels: np.ndarray
    image: np.ndarray | None = None
    held_out_indices: tuple[int, ...] = ()
    info: dict = field(default_factory=dict)


@dataclass
class _Component:
    label: int
    voxels: int
    members: np.ndarray  # [CENTRE_SAMPLES, 3] voxel coordinates inside the component


class _GpuVolume:
    """A cached volume on the device with what target drawing needs, measured once on the host.

    components: int16 [X, Y, Z], 0 background, c >= 1 the c-th connected component (26-connected) of one label;
    component_label: long [C + 1] its label index; image: uint8 [X, Y, Z] or None; neighbours: label index ->
    the label indices touching it (face neighbours, background excluded)."""

    def __init__(self, volume: CachedVolume, device: torch.device) -> None:
        self.name, self.info = volume.name, volume.info
        labels = volume.labels
        if labels.dtype != np.uint8 or labels.ndim != 3:
            raise ValueError(f"{volume.name}: labels must be uint8 [X, Y, Z], got {labels.dtype} {labels.shape}")
        self.shape = labels.shape
        self.held_out = set(volume.held_out_indices)
        rng = np.random.default_rng(0)  # which member voxels are kept: fixed, the cache is data
        components = np.zeros(labels.shape, dtype=np.int32)
        self.components_info: list[_Component] = [_Component(0, 0, np.zeros((0, 3)))]
        for label, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is None:
                continue
            parts, count = ndimage.label(labels[box] == label, structure=np.ones((3, 3, 3)))
            inside = parts > 0
            first = len(self.components_info)
            components[box][inside] = parts[inside] + (first - 1)
            # member voxels of every part at once: voxels sorted by part, CENTRE_SAMPLES random picks per part
            voxels = np.argwhere(inside) + np.array([s.start for s in box])
            order = np.argsort(parts[inside], kind="stable")
            sizes = np.bincount(parts[inside], minlength=count + 1)[1:]
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            picks = starts[:, None] + (rng.random((count, CENTRE_SAMPLES)) * sizes[:, None]).astype(np.int64)
            members = voxels[order][picks]  # [count, CENTRE_SAMPLES, 3]
            self.components_info += [_Component(label, int(n), m) for n, m in zip(sizes, members)]
        if len(self.components_info) > np.iinfo(np.int16).max:
            raise ValueError(f"{volume.name}: {len(self.components_info)} components do not fit int16")
        self.components = torch.from_numpy(components.astype(np.int16)).to(device)
        self.component_label = torch.tensor([c.label for c in self.components_info], device=device)
        self.image = None if volume.image is None else torch.from_numpy(volume.image).to(device)
        self.neighbours = _touching_labels(labels)
        self.label_voxels: dict[int, int] = {}
        for c in self.components_info[1:]:
            self.label_voxels[c.label] = self.label_voxels.get(c.label, 0) + c.voxels
        self.max_label = int(labels.max())

    def targetable(self, label: int) -> bool:
        return label != 0 and label not in self.held_out


def _touching_labels(labels: np.ndarray) -> dict[int, list[int]]:
    """labels uint8 [X, Y, Z] -> {label: sorted labels sharing a face with it} (background left out)."""
    pairs = set()
    for axis in range(3):
        a = np.moveaxis(labels, axis, 0)[:-1].ravel().astype(np.int32)
        b = np.moveaxis(labels, axis, 0)[1:].ravel().astype(np.int32)
        touching = (a != b) & (a > 0) & (b > 0)
        codes = np.unique(a[touching] * MAX_LABELS + b[touching])
        pairs.update(zip((codes // MAX_LABELS).tolist(), (codes % MAX_LABELS).tolist()))
    neighbours: dict[int, set[int]] = {}
    for a, b in pairs:
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)
    return {label: sorted(others) for label, others in neighbours.items()}


class TrainingCache:
    """The volumes one synthesiser draws from, moved to `device` once."""

    def __init__(self, volumes: list[CachedVolume], device: torch.device | str = "cpu") -> None:
        if not volumes:
            raise ValueError("a training cache needs at least one volume")
        self.device = torch.device(device)
        self.volumes = [_GpuVolume(v, self.device) for v in volumes]

    @classmethod
    def load(cls, path: Path | str, device: torch.device | str = "cpu", split: str = "train") -> TrainingCache:
        """The cache file of scripts/build_training_cache.py. split "train": the volumes that may train shipped
        weights, held-out classes excluded from targets; "validation": the held-out and validation-only volumes,
        every class a target."""
        if split not in ("train", "validation"):
            raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
        with np.load(path) as archive:
            metadata = json.loads(str(archive["metadata"]))
            volumes = []
            for index, record in enumerate(metadata["volumes"]):
                validation = record["held_out"] or record["validation_only"]
                if validation != (split == "validation"):
                    continue
                image_key = f"image_{index:03d}"
                volumes.append(
                    CachedVolume(
                        name=f"{record['set']}:{Path(record['source_file']).name.split('.')[0]}",
                        labels=archive[f"labels_{index:03d}"],
                        image=archive[image_key] if image_key in archive.files else None,
                        held_out_indices=tuple(record["held_out_indices"]) if split == "train" else (),
                        info=record,
                    )
                )
        return cls(volumes, device)


@dataclass
class _Plan:
    """Host-side choices for one sample: which volume, which target, where, and the affine."""

    mode: str
    volume: _GpuVolume
    target_labels: tuple[int, ...]  # label indices whose union is the target (empty: component or pseudo)
    target_component: int  # component index, or 0
    centre: np.ndarray  # [3] source voxel the crop's (jittered) centre maps to
    offset: np.ndarray  # [3] output-voxel offset of that point from the crop centre
    matrix: np.ndarray  # [3, 3] output voxel step -> source voxel step
    ct: bool  # CT-like intensities (label maps only; the real images are MR)
    name: str


class Synthesiser:
    """Draws batches of training crops from a TrainingCache; every random number from `generator`."""

    def __init__(
        self,
        cache: TrainingCache,
        config: SynthesisConfig = SynthesisConfig(),
        generator: torch.Generator | None = None,
    ) -> None:
        self.cache, self.config = cache, config
        self.device = cache.device
        self.generator = generator if generator is not None else torch.Generator(self.device).manual_seed(0)
        if self.generator.device.type != self.device.type:
            raise ValueError(f"generator on {self.generator.device}, cache on {self.device}")
        seed = int(torch.randint(2**62, (), generator=self.generator, device=self.device))
        self.host = torch.Generator().manual_seed(seed)
        self.by_mode = {
            "label_map": [v for v in cache.volumes if v.image is None and _has_target(v)],
            "real_pair": [v for v in cache.volumes if v.image is not None and _has_target(v)],
            "pseudo_object": [v for v in cache.volumes if v.image is not None],
        }
        self.mode_weights = torch.tensor(
            [w if self.by_mode[m] else 0.0 for m, w in zip(MODES, config.mode_weights)], dtype=torch.float64
        )
        if self.mode_weights.sum() <= 0:
            raise ValueError("the cache has no volume for any mode with a positive weight")
        s = config.size
        axis = torch.arange(s, device=self.device, dtype=torch.float32) - (s - 1) / 2
        self.centred_grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)

    # ------------------------------------------------------------------------------------------- public

    def next_batch(
        self, batch_size: int, return_labels: bool = False
    ) -> tuple[Tensor, Tensor, list[str]] | tuple[Tensor, Tensor, list[str], Tensor]:
        """images float32 [B, 1, S, S, S] normalised like real images, targets bool [B, 1, S, S, S] (never
        empty), source names [B]; with return_labels also the crops' label indices uint8 [B, 1, S, S, S]
        (0 where the sample has no label map: pseudo-objects)."""
        images = torch.empty((batch_size, 1, *(self.config.size,) * 3), device=self.device)
        targets = torch.empty(images.shape, dtype=torch.bool, device=self.device)
        labels = torch.zeros(images.shape, dtype=torch.uint8, device=self.device)
        inside = torch.ones(images.shape, dtype=torch.bool, device=self.device)
        names: list[str] = [""] * batch_size
        pending = list(range(batch_size))
        for _ in range(self.config.max_attempts):
            image, target, label, fov, drawn = self._draw(len(pending))
            voxels = target.flatten(1).sum(1)
            valid = (voxels >= self.config.min_target_voxels) & (
                voxels <= self.config.max_target_fraction * target[0].numel()
            )
            keep = valid.tolist()  # the batch's one synchronisation
            for slot, ok, b in zip(list(pending), keep, range(len(pending))):
                if ok:
                    images[slot], targets[slot], labels[slot], names[slot] = image[b], target[b], label[b], drawn[b]
                    inside[slot] = fov[b]
                    pending.remove(slot)
            if not pending:
                break
        else:
            raise RuntimeError(f"no valid target after {self.config.max_attempts} attempts for {len(pending)} samples")
        images = normalise_batch(images, inside)  # as inference normalises a real image
        return (images, targets, names, labels) if return_labels else (images, targets, names)

    # ------------------------------------------------------------------------------------------ drawing

    def _draw(self, count: int) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        """count raw samples: intensities float [N, 1, S, S, S] (not normalised), targets bool, labels uint8, and
        the real image's field of view bool (everywhere for a label map)."""
        plans = [self._plan() for _ in range(count)]
        s = self.config.size
        components = torch.empty((count, s, s, s), dtype=torch.long, device=self.device)
        real = torch.zeros((count, 1, s, s, s), device=self.device)
        placements = copy_to_device(
            torch.tensor(
                np.array([[*p.matrix.ravel(), *(p.centre - p.matrix @ p.offset), *p.volume.shape] for p in plans]),
                dtype=torch.float32,
            ),
            self.device,
        )  # [N, 15]: each plan's matrix, shift and source shape, in one copy
        for b, plan in enumerate(plans):
            grid = self._grid(placements[b])
            components[b] = _resample(plan.volume.components[None, None].float(), grid, "nearest")[0, 0].round().long()
            if plan.volume.image is not None and plan.mode != "label_map":
                # shifted by one so that the outside of the image (-1) is told from its dark voxels (0)
                real[b, 0] = _resample(plan.volume.image[None, None].float() + 1, grid, "bilinear")[0, 0] - 1
        inside_image = real > -0.5
        real = real.clamp_min(0)
        labels = torch.stack([p.volume.component_label[components[b]] for b, p in enumerate(plans)])  # [N, S, S, S]
        wanted = torch.zeros((count, MAX_LABELS), dtype=torch.bool)  # the target's labels, each plan's row
        for b, plan in enumerate(plans):
            wanted[b, list(plan.target_labels)] = True
        wanted = copy_to_device(wanted, self.device)
        targets = torch.zeros((count, s, s, s), dtype=torch.bool, device=self.device)
        for b, plan in enumerate(plans):
            if plan.target_component:
                targets[b] = components[b] == plan.target_component
            elif plan.target_labels:
                targets[b] = wanted[b][labels[b]]
        images = self._intensities(plans, labels)[:, None]
        is_real = copy_to_device(torch.tensor([p.mode != "label_map" for p in plans]), self.device)
        images = torch.where(is_real.view(-1, 1, 1, 1, 1), real, images)
        pseudo = [b for b, p in enumerate(plans) if p.mode == "pseudo_object"]
        if pseudo:
            index = copy_to_device(torch.tensor(pseudo), self.device)
            regions = pseudo_object(
                real.index_select(0, index), inside_image.index_select(0, index), self.config, self.generator, self.host
            )
            targets.index_copy_(0, index, regions[:, 0])
            labels.index_fill_(0, index, 0)
        images = self._acquisition(images, ct=[p.ct for p in plans])
        return images, targets[:, None], labels.to(torch.uint8)[:, None], inside_image, [p.name for p in plans]

    def _plan(self) -> _Plan:
        config, host = self.config, self.host
        mode = MODES[int(torch.multinomial(self.mode_weights, 1, generator=host))]
        volumes = self.by_mode[mode]
        volume = volumes[int(torch.randint(len(volumes), (), generator=host))]
        target_labels: tuple[int, ...] = ()
        component = 0
        if mode == "pseudo_object":
            centre = np.array([_uniform(host, 0.25 * (n - 1), 0.75 * (n - 1)) for n in volume.shape])  # seed inside
            name = f"{volume.name}:pseudo-object"
        else:
            kind = TARGET_KINDS[int(torch.multinomial(torch.tensor(config.target_weights), 1, generator=host))]
            target_labels, component = self._target(volume, kind)
            first = component or _random_component(volume, target_labels[0], host)
            members = volume.components_info[first].members
            centre = members[int(torch.randint(len(members), (), generator=host))].astype(np.float64)
            values = volume.info.get("values")  # the original label values, where the cache has them

            def shown(index: int) -> str:
                return str(values[index - 1]) if values else str(index)

            if target_labels:
                label_text = "+".join(shown(i) for i in target_labels)
            else:
                label_text = f"{shown(volume.components_info[component].label)} part {component}"
            name = f"{volume.name}:{kind} {label_text}"
        jitter = config.centre_jitter * config.size if mode != "pseudo_object" else 0.0  # its seed is central
        offset = np.array([_uniform(host, -jitter, jitter) for _ in range(3)])
        ct = mode == "label_map" and float(torch.rand((), generator=host)) < config.ct_probability
        matrix = random_affine(host, config)
        return _Plan(mode, volume, target_labels, component, centre, offset, matrix, ct, name)

    def _target(self, volume: _GpuVolume, kind: str) -> tuple[tuple[int, ...], int]:
        """(label indices of the target, 0) or ((), component index); never a held-out class."""
        host = self.host
        candidates = [label for label in volume.label_voxels if volume.targetable(label)]
        if kind == "component":
            parts = [
                i
                for i, c in enumerate(volume.components_info)
                if i
                and volume.targetable(c.label)
                and c.voxels >= self.config.min_target_voxels
                and c.voxels < volume.label_voxels[c.label]  # a label of one part is the "label" kind
            ]
            if parts:
                return (), parts[int(torch.randint(len(parts), (), generator=host))]
            kind = "label"
        first = candidates[int(torch.randint(len(candidates), (), generator=host))]
        chosen = [first]
        if kind == "union":
            for _ in range(1 + int(torch.randint(2, (), generator=host))):  # 2 or 3 labels
                touching = sorted(
                    {n for label in chosen for n in volume.neighbours.get(label, []) if volume.targetable(n)}
                    - set(chosen)
                )
                if not touching:
                    break
                chosen.append(touching[int(torch.randint(len(touching), (), generator=host))])
        return tuple(chosen), 0

    def _grid(self, placement: Tensor) -> Tensor:
        """The sampling grid [1, S, S, S, 3] of grid_sample (x, y, z = last, middle, first source axis, in
        [-1, 1], align_corners=True): affine, flip and deformation together. placement [15] on the device: the
        plan's matrix [3, 3] (output voxel step -> source voxel step), shift [3] and source shape [3]."""
        config = self.config
        matrix, shift, shape = placement[:9].view(3, 3), placement[9:12], placement[12:]
        points = self.centred_grid @ matrix.T + shift  # [S^3, 3] source voxels
        std = _uniform(self.host, 0.0, config.deformation_std_max)
        if std > 0:
            cells = config.deformation_cells
            coarse = std * torch.randn((1, 3, cells, cells, cells), generator=self.generator, device=self.device)
            field = F.interpolate(coarse, size=(config.size,) * 3, mode="trilinear", align_corners=True)
            points = points + field[0].reshape(3, -1).T
        normalised = 2 * points / (shape - 1).clamp_min(1) - 1
        return normalised.flip(-1).reshape(1, config.size, config.size, config.size, 3)

    def _intensities(self, plans: list[_Plan], labels: Tensor) -> Tensor:
        """Per-label Gaussian intensities [N, S, S, S] from labels long [N, S^3]."""
        config, host = self.config, self.host
        count = len(plans)
        means = torch.empty((count, MAX_LABELS))
        stds = torch.empty((count, MAX_LABELS))
        classes = torch.arange(MAX_LABELS).repeat(count, 1)
        for b, plan in enumerate(plans):
            means[b], stds[b] = (ct_profile if plan.ct else mr_profile)(host, config)
            if float(torch.rand((), generator=host)) < config.share_probability:
                volume = plan.volume
                classes[b] = generation_classes(volume.neighbours, volume.max_label, config.share_fraction, host)
        means = copy_to_device(means.gather(1, classes), self.device)
        stds = copy_to_device(stds.gather(1, classes), self.device)
        flat = labels.flatten(1)
        noise = torch.randn(flat.shape, generator=self.generator, device=self.device)
        values = means.gather(1, flat) + stds.gather(1, flat) * noise
        return values.reshape(count, *(config.size,) * 3)

    def _acquisition(self, images: Tensor, ct: list[bool]) -> Tensor:
        """Partial volume, resolution, bias (MR), noise and gamma (MR) on images [N, 1, S, S, S]."""
        config, host, generator = self.config, self.host, self.generator
        sigmas = [_uniform(host, 0.0, config.partial_volume_sigma_max) for _ in ct]
        images = gaussian_blur(images, torch.tensor(sigmas))
        for b in range(len(ct)):
            if float(torch.rand((), generator=host)) < config.low_resolution_probability:
                images[b] = low_resolution(images[b : b + 1], resolution_factors(host, config))[0]
        mr = [b for b, is_ct in enumerate(ct) if not is_ct]
        mr_index = copy_to_device(torch.tensor(mr), self.device) if mr else None
        if mr:
            biased = images.index_select(0, mr_index).clamp_min(0)
            images = images.index_copy(
                0, mr_index, biased * bias_field(len(mr), config, host, generator, images.shape[-1])
            )
        ranges = (images.flatten(1).amax(1) - images.flatten(1).amin(1)).clamp_min(1e-3)
        stds = torch.tensor([_uniform(host, 0.0, config.noise_std_max) for _ in ct])
        stds = copy_to_device(stds, self.device) * ranges
        images = images + stds.view(-1, 1, 1, 1, 1) * torch.randn(images.shape, generator=generator, device=self.device)
        if mr:
            gammas = torch.tensor([math.exp(config.gamma_std * float(torch.randn((), generator=host))) for _ in mr])
            images = images.index_copy(
                0, mr_index, gamma(images.index_select(0, mr_index), copy_to_device(gammas, self.device))
            )
        return images


def _has_target(volume: _GpuVolume) -> bool:
    return any(volume.targetable(label) for label in volume.label_voxels)


def _uniform(host: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=host))


def _random_component(volume: _GpuVolume, label: int, host: torch.Generator) -> int:
    """A component of `label`, drawn in proportion to its size (a crop centred on a speck is a bad target)."""
    parts = [i for i, c in enumerate(volume.components_info) if c.label == label]
    sizes = torch.tensor([volume.components_info[i].voxels for i in parts], dtype=torch.float64)
    return parts[int(torch.multinomial(sizes, 1, generator=host))]


def _resample(volume: Tensor, grid: Tensor, mode: str) -> Tensor:
    """volume [1, C, X, Y, Z] float at grid [1, S, S, S, 3] -> [1, C, S, S, S]; zero outside."""
    return F.grid_sample(volume, grid, mode=mode, padding_mode="zeros", align_corners=True)


# --------------------------------------------------------------------------------------- pure augmentations


def random_affine(host: torch.Generator, config: SynthesisConfig) -> np.ndarray:
    """[3, 3] output-voxel step -> source-voxel step: flips, rotation, scaling, shear and magnification drawn from
    config."""

    def uniform(bound: float, shape: tuple[int, ...]) -> np.ndarray:
        return ((torch.rand(shape, generator=host, dtype=torch.float64) * 2 - 1) * bound).numpy()

    angles = np.deg2rad(uniform(config.rotation_degrees, (3,)))
    rotation = np.eye(3)
    for axis, angle in enumerate(angles):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [a for a in range(3) if a != axis]
        step = np.eye(3)
        step[i, i], step[i, j], step[j, i], step[j, j] = c, -s, s, c
        rotation = rotation @ step
    shear = np.eye(3) + uniform(config.shear_range, (3, 3)) * (1 - np.eye(3))  # off-diagonal terms only
    scale = np.diag(1.0 + uniform(config.scale_range, (3,)))
    flips = np.diag(np.where(torch.rand(3, generator=host).numpy() < config.flip_probability, -1.0, 1.0))
    low, high = np.log(config.magnification_range)
    magnification = math.exp(low + (high - low) * float(torch.rand((), generator=host, dtype=torch.float64)))
    return rotation @ shear @ scale @ flips / magnification


def mr_profile(host: torch.Generator, config: SynthesisConfig) -> tuple[Tensor, Tensor]:
    """Means and stds [MAX_LABELS] on a 0-255 scale; the background (0) is dark half the time."""
    low, high = config.mr_mean_range
    means = low + (high - low) * torch.rand(MAX_LABELS, generator=host)
    stds = config.mr_std_range[0] + (config.mr_std_range[1] - config.mr_std_range[0]) * torch.rand(
        MAX_LABELS, generator=host
    )
    if float(torch.rand((), generator=host)) < 0.5:
        means[0], stds[0] = 5.0 * float(torch.rand((), generator=host)), 2.0
    return means, stds


def ct_profile(host: torch.Generator, config: SynthesisConfig) -> tuple[Tensor, Tensor]:
    """Means and stds [MAX_LABELS] in Hounsfield units: mostly soft tissue and fat (-150..250), some bone
    (300..1500), air (-1000) around most of the time."""
    del config  # CT ranges are physical, not configured
    soft = -150.0 + 400.0 * torch.rand(MAX_LABELS, generator=host)
    bone = 300.0 + 1200.0 * torch.rand(MAX_LABELS, generator=host)
    means = torch.where(torch.rand(MAX_LABELS, generator=host) < 0.15, bone, soft)
    stds = 3.0 + 27.0 * torch.rand(MAX_LABELS, generator=host)
    if float(torch.rand((), generator=host)) < 0.8:
        means[0], stds[0] = -1000.0 + 50.0 * float(torch.rand((), generator=host)), 10.0
    return means, stds


def generation_classes(
    neighbours: dict[int, list[int]], max_label: int, fraction: float, host: torch.Generator
) -> Tensor:
    """[MAX_LABELS] long: the label whose intensity each label takes. A `fraction` of the labels take a touching
    neighbour's (chains resolved, so a group shares one intensity); the rest keep their own."""
    classes = torch.arange(MAX_LABELS)
    for label in range(1, max_label + 1):
        others = neighbours.get(label)
        if others and float(torch.rand((), generator=host)) < fraction:
            classes[label] = others[int(torch.randint(len(others), (), generator=host))]
    for _ in range(8):  # follow chains a -> b -> c to their end (cycles stop anywhere: still one intensity each)
        classes = classes[classes]
    return classes


def gaussian_blur(images: Tensor, sigmas: Tensor) -> Tensor:
    """images [N, 1, S, S, S] each blurred by its own isotropic Gaussian sigma (voxels; sigmas [N], 0 = none)."""
    radius = max(1, math.ceil(3 * float(sigmas.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernels = torch.exp(-0.5 * (offsets[None] / sigmas.clamp_min(1e-3)[:, None].float()) ** 2)
    kernels = copy_to_device(kernels / kernels.sum(1, keepdim=True), images.device)  # [N, 2r + 1]; sigma 0 -> a delta
    n = images.shape[0]
    out = images.reshape(1, n, *images.shape[2:])
    for axis in range(3):
        shape = [n, 1, 1, 1, 1]
        shape[2 + axis] = 2 * radius + 1
        padding = [0, 0, 0]
        padding[axis] = radius
        out = F.conv3d(F.pad(out, _pad_spec(padding), mode="replicate"), kernels.reshape(shape), groups=n)
    return out.reshape(images.shape)


def _pad_spec(padding: list[int]) -> tuple[int, ...]:
    """Per-axis padding (first, second, third spatial axis) -> F.pad's last-axis-first pairs."""
    return (padding[2], padding[2], padding[1], padding[1], padding[0], padding[0])


def resolution_factors(host: torch.Generator, config: SynthesisConfig) -> tuple[float, float, float]:
    """Thick slices along one random axis, or coarse voxels along all: the factor of each axis (>= 1)."""
    if float(torch.rand((), generator=host)) < 0.5:
        factors = [1.0, 1.0, 1.0]
        factors[int(torch.randint(3, (), generator=host))] = _uniform(host, *config.thick_slice_factor_range)
        return tuple(factors)
    factor = _uniform(host, *config.coarse_voxel_factor_range)
    return (factor, factor, factor)


def low_resolution(images: Tensor, factors: tuple[float, float, float]) -> Tensor:
    """images [N, C, S, S, S] averaged down by `factors` per axis (the slice thickness as a box profile) and
    interpolated back trilinearly, as a thick-slice scan looks once resampled to 1.5 mm."""
    size = images.shape[2:]
    coarse = [max(2, round(n / f)) for n, f in zip(size, factors)]
    low = F.interpolate(images, size=coarse, mode="area")
    return F.interpolate(low, size=size, mode="trilinear", align_corners=False)


def bias_field(
    count: int, config: SynthesisConfig, host: torch.Generator, generator: torch.Generator, size: int
) -> Tensor:
    """Multiplicative smooth fields [count, 1, size, size, size]: exp of a coarse Gaussian field, upsampled."""
    stds = torch.tensor([_uniform(host, 0.0, config.bias_std_max) for _ in range(count)])
    stds = copy_to_device(stds, generator.device)
    cells = config.bias_cells
    coarse = torch.randn((count, 1, cells, cells, cells), generator=generator, device=generator.device)
    coarse = coarse * stds.view(-1, 1, 1, 1, 1)
    return torch.exp(F.interpolate(coarse, size=(size,) * 3, mode="trilinear", align_corners=True))


def gamma(images: Tensor, exponents: Tensor) -> Tensor:
    """images [N, 1, S, S, S] scaled to [0, 1] each, raised to its exponent (exponents [N])."""
    flat = images.flatten(1)
    low, high = flat.amin(1).view(-1, 1, 1, 1, 1), flat.amax(1).view(-1, 1, 1, 1, 1)
    scaled = ((images - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    return scaled ** exponents.view(-1, 1, 1, 1, 1)


def pseudo_object(
    images: Tensor, inside: Tensor, config: SynthesisConfig, generator: torch.Generator, host: torch.Generator
) -> Tensor:
    """Intensity-connected regions: images [N, 1, S, S, S], inside bool [N, 1, S, S, S] (the image's field of
    view) -> bool [N, 1, S, S, S], inside the field of view.

    The smoothed image (half resolution) is quantised into a random number of levels at the quantiles of its
    field of view; the target is the region of the seed's level connected to the seed (a voxel near the crop
    centre) within `pseudo_growth_steps` dilations, then upsampled. Like a supervoxel, it follows real edges of
    a real image.
    """
    n, size = images.shape[0], images.shape[-1]
    half = F.avg_pool3d(images, 2)  # [N, 1, S/2, ...]: smoothing and half the work
    half_inside = -F.max_pool3d(-inside.float(), 2) > 0  # all 8 voxels inside
    low, high = config.pseudo_levels_range
    levels = [int(torch.randint(low, high + 1, (), generator=host)) for _ in range(n)]
    edges = quantile_edges(half.flatten(1), half_inside.flatten(1), levels)  # [N, max(levels) - 1]
    below = (half.flatten(1)[:, :, None] > edges[:, None, :]).sum(-1)  # torch.bucketize's index, per sample
    # -1 outside the field of view: never the seed's
    quantised = torch.where(half_inside, below.view_as(half), -1)
    centre = half.shape[-1] // 2
    spread = max(1, half.shape[-1] // 8)
    seeds = torch.randint(centre - spread, centre + spread, (n, 3), generator=generator, device=images.device)
    index = torch.arange(n, device=images.device)
    seed_level = quantised[index, 0, seeds[:, 0], seeds[:, 1], seeds[:, 2]]
    same = (quantised == seed_level.view(-1, 1, 1, 1, 1)) & half_inside  # a seed outside gives no target
    region = torch.zeros_like(same)
    region[index, 0, seeds[:, 0], seeds[:, 1], seeds[:, 2]] = True
    region &= same
    for _ in range(config.pseudo_growth_steps):
        region = (F.max_pool3d(region.float(), 3, stride=1, padding=1) > 0) & same
    return F.interpolate(region.float(), size=(size,) * 3, mode="nearest") > 0


def quantile_edges(values: Tensor, inside: Tensor, levels: list[int]) -> Tensor:
    """The edges [N, max(levels) - 1] that cut each row of values [N, V] into levels[n] equally filled levels
    over its voxels inside [N, V] (torch.quantile's linear interpolation at 1/levels, 2/levels, ...); a row's
    unused edges are its maximum, above which nothing lies. Sorted rows and gathers, no boolean indexing."""
    ordered = torch.where(inside, values, torch.inf).sort(1).values  # the voxels inside first, ascending
    last = (inside.sum(1, keepdim=True) - 1).clamp_min(0)  # the index of each row's largest voxel inside
    fractions = torch.ones(len(levels), max(levels) - 1)
    for row, count in enumerate(levels):
        fractions[row, : count - 1] = torch.arange(1, count) / count
    position = copy_to_device(fractions, values.device) * last
    lower = position.floor().long()
    upper = torch.minimum(lower + 1, last)
    return torch.lerp(ordered.gather(1, lower), ordered.gather(1, upper), position - lower)
