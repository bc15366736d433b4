"""Where training samples come from: real targets (crops handed to `fit`, or `--data-dir` pair files) mixed with
synthetic volumes, drawn into batches; and the cache of image embeddings a frozen encoder allows.

Each sample is a crop and one binary target. A `--data-dir` holds `*.pt` files written by `save_training_pair`
({"image": float [1, S, S, S] normalised, "label": int or bool [1, S, S, S]}; each non-zero label value is its own
target). Synthetic volumes (lib.training.synthetic) are fresh every step, or a fixed pool of `synthetic_pool`;
made on the training device, or by `synthetic_workers` host processes (what keeps a GPU busy).
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

    def next_batch(self, rng: np.random.Generator) -> tuple[list[str | None], Tensor, Tensor]:
        keys, images, masks = [], [], []
        for _ in range(self.config.batch_size):
            key, image, mask = self._sample(rng)
            keys.append(key)
            images.append(image.to(self.device, non_blocking=True))
            masks.append(mask.to(self.device, non_blocking=True))
        return keys, torch.stack(images), torch.stack(masks)

    def _sample(self, rng: np.random.Generator) -> tuple[str | None, Tensor, Tensor]:
        if rng.random() < self.synthetic_fraction:
            if not self.pool:
                return (None, *self._synthetic())
            index = int(rng.integers(len(self.pool)))
            return (f"synthetic:{index}", *self.pool[index])
        target = self.targets[int(rng.integers(len(self.targets)))]
        return f"real:{target.image_key}", target.image, target.mask

    def close(self) -> None:
        """Stop the synthetic workers now. Left to interpreter exit, their shutdown aborted them on the GPU
        machine ("terminate called without an active exception"); dropping the last reference to the loader's
        iterator shuts them down in order."""
        self.stream = None

    def _synthetic(self) -> tuple[Tensor, Tensor]:
        if self.stream is not None:
            return next(self.stream)
        return synthetic_sample(self.generator, self.synthetic_config)


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
