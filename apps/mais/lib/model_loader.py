"""The served model: the weights file the app serves (`AppSettings.served_weights`), loaded once, reloaded when a
training run publishes new weights, and shared read-only by the infer task, the trainer and active learning.

`get()` returns the model together with the version of the file it was loaded from, as one value: a caller that
records which weights made a result (active learning's scores) must not read the version separately, since a
publish in between would file the result under weights that did not make it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import NamedTuple

import torch

from lib.configs.app_settings import AppSettings
from lib.devices import resolve_device
from lib.model.interaction import InteractionState
from lib.model.mais import Mais
from lib.model.weights import WeightsError, load_mais

logger = logging.getLogger(__name__)

# Loads of a file that changed while it was read before giving up (a publish is one os.replace: one retry suffices).
MAX_LOAD_ATTEMPTS = 3


class ServedModel(NamedTuple):
    """model: eval mode, on the loader's device. version: `<file name>@<inode>:<modification time ns>` of the file
    the weights were read from; it changes whenever training publishes."""

    model: Mais
    version: str


class ModelLoader:
    """Loads the served weights file and reloads it when it changes: the check is one stat() per `get`, so the
    next click after a training run uses the new weights. Thread-safe."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        # "cuda" without a visible GPU serves on the CPU, as "auto" does
        self.device = resolve_device("cpu" if settings.device == "cpu" else "auto")
        self._served: ServedModel | None = None
        self._file_id: tuple[int, int] | None = None  # (inode, mtime ns) of the file `_served` was read from
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.settings.served_weights()

    def get(self) -> ServedModel:
        """The served model and its version; raises WeightsError naming the file when it is missing or damaged."""
        path = self.path
        with self._lock:
            if self._served is None or _file_id(path) != self._file_id:
                self._served, self._file_id = self._load(path)
            return self._served

    def _load(self, path: Path) -> tuple[ServedModel, tuple[int, int]]:
        """Load `path`, again if it was replaced while being read, and warm the model up."""
        for _ in range(MAX_LOAD_ATTEMPTS):
            before = _file_id(path)
            model = load_mais(path, device=self.device, memory_mode=self.settings.memory_mode)
            if _file_id(path) == before:
                break
        else:
            raise WeightsError(f"{path}: replaced {MAX_LOAD_ATTEMPTS} times while being read")
        started = time.perf_counter()
        prepare_for_serving(model)
        logger.info("loaded MAIS weights %s on %s (warm-up %.2f s)", path, self.device, time.perf_counter() - started)
        # the inode too: a file put back with its old modification time (cp -p, a restored backup) is new weights
        return ServedModel(model, f"{path.name}@{before[0]}:{before[1]}"), before


def prepare_for_serving(model: Mais) -> None:
    """Set a loaded model up as a served one (the server's loader and benchmarks/bench_session.py call this).

    On a GPU a served click is bound by the host's kernel launches, not by the GPU (benchmarks/RESULTS.md), so:
    the mask decoder is replayed as CUDA graphs, and PyTorch's linear layers with a bias skip cuBLASLt, which on
    the H200 host cost a click 6-12 ms more than plain cuBLAS (`DISABLE_ADDMM_CUDA_LT`, read by PyTorch once, at
    the process's first such product: the served model's warm-up below, unless something ran before it).
    Then the warm-up."""
    if next(model.parameters()).is_cuda:
        os.environ.setdefault("DISABLE_ADDMM_CUDA_LT", "1")
        model.use_cuda_graphs()
    warm_up(model)


@torch.inference_mode()
def warm_up(model: Mais) -> None:
    """One interaction step on a blank crop: the first call of each pays for kernel selection and memory
    allocation (on a GPU, seconds; with CUDA graphs, the recording of the first click's), which the first click
    would pay otherwise."""
    device, size = next(model.parameters()).device, model.img_size
    blank = torch.zeros((1, 1, size, size, size), device=device)
    centre = torch.full((1, 1, 3), size / 2, device=device)
    InteractionState.start(model, volume=blank).step(
        model, model.embed_image(blank), blank, centre, torch.ones((1, 1), dtype=torch.int64, device=device)
    )


def _file_id(path: Path) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file (--conf weights)") from None
    return stat.st_ino, stat.st_mtime_ns
