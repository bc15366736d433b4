"""Where training samples come from: real targets (crops handed to `fit`, or `--data-dir` pair files) mixed with
synthetic volumes, drawn into batches; and the cache of image embeddings a frozen encoder allows.

Each sample is a crop and one binary target. A `--data-dir` holds `*.pt` files written by `save_training_pair`
({"image": float [1, S, S, S] normalised, "label": int or bool [1, S, S, S]}; each non-zero label value is its own
target). Synthetic volumes (lib.training.synthetic) are fresh every step, or a fixed pool of `synthetic_pool`;
made on the training device, or by `synthetic_workers` host processes. A `cache_fraction` of the samples is
synthesised on the training device from the label maps and real pairs of a `training_cache`
(lib.training.synthesis): with a GPU, nothing of a batch is made on the host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lib.model.mais import Mais
from lib.training.config import FitConfig
from lib.training.synthesis import Synthesiser, TrainingCache
from lib.training.synthetic import SyntheticConfig, synthetic_sample, synthetic_stream

logger = logging.getLogger(__name__)


@dataclass
class Target:
    """One real training target: image [1, S, S, S] float32 (CPU), mask [1, S, S, S] bool (CPU), and the key of
    its image in the embedding cache (targets of one image share it)."""

    image_key: str
    image: Tensor
    mask: Tensor


def save_training_pair(path: str | os.PathLike, image: Tensor, label: Tensor) -> None:
    """Write one `--data-dir` file: image float [1, S, S, S] normalised, label int or bool [1, S, S, S]."""
    torch.save({"image": image.float().cpu(), "label": label.cpu()}, path)


def load_training_pairs(data_dir: Path, size: int) -> list[Target]:
    """Every (image, non-zero label value) target of the `*.pt` files in `data_dir` (see `save_training_pair`)."""
    targets = []
    for path in sorted(Path(data_dir).glob("*.pt")):
        pair = torch.load(path, map_location="cpu", weights_only=True)
        image, label = pair["image"].float(), pair["label"]
        if image.shape != (1, size, size, size) or label.shape != image.shape:
            raise ValueError(f"{path}: image {tuple(image.shape)} / label {tuple(label.shape)}, expected [1, {size}^3]")
        for value in torch.unique(label).tolist():
            if value:
                targets.append(Target(path.stem, image, label == value))
    logger.info("%s: %d targets", data_dir, len(targets))
    return targets


class BatchSource:
    """Draws training batches from real targets and synthetic volumes, mixed per sample by `synthetic_fraction`.

    `next_batch` returns (image_keys, images [B, 1, S, S, S], masks bool [B, 1, S, S, S]) on `device`; a key is
    None for a fresh synthetic volume (nothing to cache).
    """

    def __init__(self, config: FitConfig, targets: Sequence[Target], size: int, device: torch.device) -> None:
        self.config = config
        self.targets = list(targets)
        self.device = device
        self.synthetic_config = SyntheticConfig(size=size)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed + 1)
        self.stream = None
        if config.synthetic_workers and (config.synthetic_fraction > 0 or not self.targets):
            self.stream = synthetic_stream(config.seed + 1, config.synthetic_workers, self.synthetic_config)
        self.pool = [self._synthetic() for _ in range(config.synthetic_pool)]
        self.synthetic_fraction = config.synthetic_fraction if self.targets else 1.0
        self.training_cache = None
        if config.training_cache is not None and config.cache_fraction > 0:
            self.training_cache = TrainingCache.load(config.training_cache, device)
        self._synthesiser: Synthesiser | None = None

    def next_batch(self, rng: np.random.Generator) -> tuple[list[str | None], Tensor, Tensor]:
        batch_size = self.config.batch_size
        from_cache = 0
        if self.training_cache is not None:
            from_cache = int((rng.random(batch_size) < self.config.cache_fraction).sum())
        keys, images, masks = [], [], []
        # the shapes first, then the cache's samples: neither waits for the GPU but the cache's at its very end
        # (its target size check), so the host draws the whole batch while the GPU still runs the step before
        # (lib.training.loop)
        for _ in range(batch_size - from_cache):
            key, image, mask = self._sample(rng)
            keys.append(key)
            images.append(image.to(self.device, non_blocking=True))
            masks.append(mask.to(self.device, non_blocking=True))
        if from_cache:
            cache_images, cache_masks, _ = self.synthesiser.next_batch(from_cache)
            keys += [None] * from_cache  # fresh every step: nothing to cache
            images += list(cache_images)
            masks += list(cache_masks)
        return keys, torch.stack(images), torch.stack(masks)

    @property
    def synthesiser(self) -> Synthesiser:
        """Made at the first batch and seeded from `generator`, which a resumed run restores: a resumed run draws
        new samples instead of those its first part drew."""
        if self._synthesiser is None:
            seed = int(torch.randint(2**62, (), generator=self.generator, device=self.device))
            generator = torch.Generator(device=self.device).manual_seed(seed)
            self._synthesiser = Synthesiser(self.training_cache, generator=generator)
        return self._synthesiser

    def _sample(self, rng: np.random.Generator) -> tuple[str | None, Tensor, Tensor]:
        if rng.random() < self.synthetic_fraction:
            if not self.pool:
                # its scalars from a generator seeded by `rng`: seeding from the device generator would wait for it
                return (None, *self._synthetic(torch.Generator().manual_seed(int(rng.integers(2**62)))))
            index = int(rng.integers(len(self.pool)))
            return (f"synthetic:{index}", *self.pool[index])
        target = self.targets[int(rng.integers(len(self.targets)))]
        return f"real:{target.image_key}", target.image, target.mask

    def close(self) -> None:
        """Stop the synthetic workers now. Left to interpreter exit, their shutdown aborted them on the GPU
        machine ("terminate called without an active exception"); dropping the last reference to the loader's
        iterator shuts them down in order."""
        self.stream = None

    def _synthetic(self, host: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if self.stream is not None:
            return next(self.stream)
        return synthetic_sample(self.generator, self.synthetic_config, host)


class EmbeddingCache:
    """Image embeddings of a frozen encoder, computed once per image key and kept on the training device."""

    def __init__(self) -> None:
        self.embeddings: dict[str, Tensor] = {}
        self.hits = 0

    def embed(self, model: Mais, keys: Sequence[str | None], images: Tensor) -> Tensor:
        """[B, E, 8, 8, 8] for images [B, 1, S, S, S]; runs the encoder only on images not cached yet."""
        missing = [i for i, key in enumerate(keys) if key is None or key not in self.embeddings]
        self.hits += len(keys) - len(missing)
        computed: dict[int, Tensor] = {}
        if missing:
            with torch.no_grad():
                computed = dict(zip(missing, model.embed_image(images[missing]).float()))
            self.embeddings.update({keys[i]: e for i, e in computed.items() if keys[i] is not None})
        return torch.stack([computed[i] if i in computed else self.embeddings[key] for i, key in enumerate(keys)])
