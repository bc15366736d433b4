"""The `mais` infer task: DeepEdit-style clicks from Slicer, OHIF or scripts, answered from a per-user memory.

A thin MONAI Label adapter: requests are validated (`lib.infers.request`), routed to the user's interaction
session (`lib.session`), and the session's mask is written in the format the client asked for. A bad request
is answered with HTTP 422 naming the field; the server stays up.

MONAI Label runs inference inline in its request handler, so a click blocks every other request of the server
for its duration: keeping a later click to a decoder pass, not an encoder pass, matters for every user.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from monailabel.transform.writer import Writer

from lib.clicks.history import reconcile
from lib.clicks.simulator import POSITIVE
from lib.configs.app_settings import AppSettings
from lib.devices import resolve_device
from lib.imaging import ModelSpaceImage, VolumeError
from lib.infers.request import ClickRequest, RequestError, parse_click_request
from lib.model.weights import WeightsError, load_mais
from lib.session.interactive import InteractiveSession
from lib.session.store import SessionStore
from lib.volume_formats import volume_extension

logger = logging.getLogger(__name__)

# Images kept in model space for new sessions; a 512x512x48 CT takes ~30 MB there.
PREPARED_IMAGE_CACHE_SIZE = 8


class ModelLoader:
    """Loads the served weights file (`AppSettings.served_weights`) and reloads it when a training run publishes
    new weights: the check is one stat() per click, so the next click after a run uses the new weights."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        # "cuda" without a visible GPU serves on the CPU, as "auto" does
        self.device = resolve_device("cpu" if settings.device == "cpu" else "auto")
        self._model: torch.nn.Module | None = None
        self._version: tuple[Path, int] | None = None

    @property
    def path(self) -> Path:
        return self.settings.served_weights()

    @property
    def version(self) -> str:
        """Names the served weights file and its modification time: changes whenever training publishes."""
        path = self.path
        return f"{path.name}@{os.stat(path).st_mtime_ns}"

    def get(self) -> tuple[torch.nn.Module, bool]:
        """(model, True if it was (re)loaded by this call)."""
        path = self.path
        try:
            version = (path, os.stat(path).st_mtime_ns)
        except FileNotFoundError:
            raise WeightsError(f"{path}: no such weights file (--conf weights)") from None
        if self._model is not None and version == self._version:
            return self._model, False
        self._model = load_mais(path, device=self.device, memory_mode=self.settings.memory_mode)
        self._version = version
        logger.info("loaded MAIS weights %s on %s", path, self.device)
        return self._model, True


class MaisInfer(InferTask):
    def __init__(self, settings: AppSettings, label_map: dict[str, int], model_loader: ModelLoader):
        model_config = model_loader.get()[0].config
        super().__init__(
            type=InferType.DEEPEDIT,
            labels=label_map,
            dimension=3,
            description="MAIS: click-based 3D segmentation that remembers earlier clicks",
            config={
                # Shown by Slicer and OHIF; informative: the server's --conf values apply.
                "memory_mode": model_config.memory_mode,
                "memory_size": model_config.memory_size,
                "prompt_clicks": model_config.prompt_clicks,
                "session_ttl_s": settings.session_ttl_s,
            },
        )
        self.settings = settings
        self.label_map = label_map
        self.model_loader = model_loader
        self.sessions = SessionStore(
            ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            max_bytes=settings.max_session_mb * 2**20,
        )
        self._prepared_image = functools.lru_cache(maxsize=PREPARED_IMAGE_CACHE_SIZE)(self._prepare_image)

    def is_valid(self) -> bool:
        return self.model_loader.path.exists()

    def forget_image(self, image_path: str) -> None:
        """Start afresh on an image whose label was just saved: the saved label is the new reference."""
        dropped = self.sessions.drop_where(lambda key: key[1] == image_path)
        logger.info("dropped %d interaction session(s) of %s", dropped, image_path)

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict]:
        started = time.perf_counter()
        image_path = str(request.get("image") or "")
        try:
            clicks = parse_click_request(
                request, list(self.label_map), lambda client, clicked: self._ohif_target(client, image_path, clicked)
            )
        except RequestError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        if not os.path.isfile(image_path):
            raise HTTPException(status_code=404, detail=f"image not found: {request.get('image')!r}")

        model, reloaded = self.model_loader.get()
        if reloaded:
            self.sessions.clear()  # memories built by other weights are meaningless to the new ones
        key = (clicks.session_id or clicks.client_id, image_path, clicks.label)
        try:
            entry = self.sessions.claim(key, lambda: InteractiveSession(self._prepared(image_path), model))
        except VolumeError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None

        with entry.lock:
            session = entry.session
            _check_inside(clicks, session.image.original_shape)
            steps = self._apply(session, clicks)
            mask = session.mask.astype(clicks.result_dtype) * self.label_map[clicks.label]
            affine = session.image.original_affine
            click_count, window_count = len(session.clicks), len(session.windows)

        label_path, _ = Writer(label="pred")(
            {
                "image_path": image_path,
                "pred": mask,
                "pred_meta_dict": {"affine": affine.numpy()},
                "result_extension": clicks.result_extension or _own_extension(image_path),
                "result_dtype": clicks.result_dtype,
                "result_compress": clicks.result_compress,
            }
        )
        result = {
            "label": clicks.label,
            "label_index": self.label_map[clicks.label],
            "clicks": click_count,
            "steps_run": steps,
            "windows": window_count,
            "voxels": int(np.count_nonzero(mask)),
            "latency_s": round(time.perf_counter() - started, 4),
            "weights": self.model_loader.path.name,
        }
        logger.info("mais %s: %s", key, result)
        return label_path, result

    def _apply(self, session: InteractiveSession, clicks: ClickRequest) -> int:
        """Bring the session up to the request's click history; returns how many interaction steps ran."""
        if clicks.reset_state or not (clicks.positives or clicks.negatives):
            session.reset()
        update = reconcile(session.clicks, clicks.positives, clicks.negatives)
        if update.replay is not None:
            session.replay(update.replay)
            return len(update.replay)
        for click in update.new:
            session.add_click(click)
        return len(update.new)

    def _ohif_target(self, client_id: str | None, image_path: str, clicked: dict[str, list]) -> str:
        """OHIF sends no `label`: the target is the last label whose click list differs from its session."""
        changed = []
        for label, points in clicked.items():
            entry = self.sessions.get((client_id or "anonymous", image_path, label))
            applied = [c.coord for c in entry.session.clicks if c.label == POSITIVE] if entry else []
            if applied != [tuple(p) for p in points]:
                changed.append(label)
        return (changed or list(clicked))[-1]

    def _prepared(self, image_path: str) -> ModelSpaceImage:
        return self._prepared_image(image_path, os.stat(image_path).st_mtime_ns)

    @staticmethod
    def _prepare_image(image_path: str, mtime_ns: int) -> ModelSpaceImage:
        """Cached per (path, mtime): a session of another user or label on the same image reuses it."""
        return ModelSpaceImage.from_file(image_path)




def _check_inside(clicks: ClickRequest, shape: tuple[int, int, int]) -> None:
    for name, points in ((clicks.label, clicks.positives), ("background", clicks.negatives)):
        for point in points:
            if any(index >= size for index, size in zip(point, shape)):
                raise HTTPException(
                    status_code=422,
                    detail=f"{name}: click {list(point)} is outside the image of shape {shape}",
                )


def _own_extension(image_path: str) -> str:
    return volume_extension(image_path) or ".nii.gz"
