"""The `mais` infer task: DeepEdit-style clicks from Slicer, OHIF or scripts, answered from a session's memory.

A thin MONAI Label adapter: requests are validated (`lib.infers.request`) and checked against the image, matched
by their click history to the interaction session they continue, whoever sent them (`lib.session.store`), the
session is brought up to the request's history, and its mask is written in the format the client asked for. A
bad request is answered with HTTP 422 naming the field, unusable served weights with 503 naming the file; the
server stays up. The result reports the seconds of each stage under `latencies`, with the keys of MONAI Label's
BasicInferTask: `pre` (request, weights, image in model space, session), `infer` (interaction steps), `invert`
(logits back onto the image's grid), `write`.

MONAI Label runs inference inline in its request handler, so a click blocks every other request of the server
for its duration: keeping a later click to a decoder pass, not an encoder pass, matters for every user.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.configs.app_settings import AppSettings
from lib.imaging import ModelSpaceImage, VolumeError
from lib.infers.request import ClickRequest, RequestError, parse_click_request
from lib.mask_file import write_mask
from lib.model.weights import WeightsError
from lib.model_loader import ModelLoader
from lib.session.interactive import InteractiveSession
from lib.session.store import SessionScope, SessionStore
from lib.volume_formats import volume_extension

logger = logging.getLogger(__name__)

# Images kept in model space for new sessions; a 512x512x48 CT takes ~30 MB there.
PREPARED_IMAGE_CACHE_SIZE = 8
# the image id as the client sent it (the app adds it: MONAI Label replaces "image" by the path it resolves to)
REQUESTED_IMAGE_KEY = "requested_image"
# where click results wait for the endpoint to send and delete them (see _result_path)
RESULTS_DIR = Path(tempfile.gettempdir()) / f"mais-results-{os.getuid()}"


class MaisInfer(InferTask):
    def __init__(self, settings: AppSettings, label_map: dict[str, int], model_loader: ModelLoader):
        served = model_loader.get()
        model_config = served.model.config
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
        self._sessions_version = served.version  # the weights the stored sessions' memories were last built by
        self._prepared_image = functools.lru_cache(maxsize=PREPARED_IMAGE_CACHE_SIZE)(self._prepare_image)

    def is_valid(self) -> bool:
        return self.model_loader.path.exists()

    def forget_image(self, image_path: str) -> None:
        """Start afresh on an image whose label was just saved: the saved label is the new reference."""
        dropped = self.sessions.drop_where(lambda scope: scope.image == image_path)
        logger.info("dropped %d interaction session(s) of %s", dropped, image_path)

    def __call__(self, request: dict[str, Any]) -> tuple[str | None, dict]:
        started = time.perf_counter()
        image_path = str(request.get("image") or "")
        try:
            clicks = parse_click_request(
                request, list(self.label_map), lambda clicked: self._ohif_target(image_path, clicked)
            )
        except RequestError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        if not os.path.isfile(image_path):
            raise HTTPException(
                status_code=404, detail=f"image not found: {request.get(REQUESTED_IMAGE_KEY, request.get('image'))!r}"
            )
        try:
            model, version = self.model_loader.get()
        except WeightsError as error:  # e.g. a published file deleted or damaged by hand: fixable, no restart
            raise HTTPException(status_code=503, detail=f"the served weights cannot be used: {error}") from None
        if version != self._sessions_version:
            # memories built by other weights are meaningless to the new ones; a session a request of the old
            # weights stores after this is out of every new request's scope and ages out
            self.sessions.drop_where(lambda scope: scope.weights != version)
            self._sessions_version = version
        scope = SessionScope(image_path, clicks.label, version)
        with self.sessions.continued(
            scope,
            clicks.positives,
            clicks.negatives,
            owner=clicks.owner,
            # a session's image is its own: only a new session prepares one (the cache holds a few images only)
            create=lambda: self._new_session(image_path, model, clicks),
            reset=clicks.reset_state,
        ) as (session, history):
            _check_inside(clicks, session.image.original_shape)  # a bad click leaves the session as it was
            prepared = time.perf_counter()
            update = session.advance(history)
            # one pass, keeping the mask's Fortran order (see InteractiveSession.reset)
            mask = np.multiply(session.mask, self.label_map[clicks.label], dtype=clicks.result_dtype)
            affine, click_count, window_count = session.image.original_affine, len(session.clicks), len(session.windows)

        written = time.perf_counter()
        label_path = _result_path(clicks.result_extension or _own_extension(image_path))
        write_mask(label_path, mask, affine.numpy(), compress=clicks.result_compress)
        finished = time.perf_counter()
        result = {
            "label": clicks.label,
            "label_index": self.label_map[clicks.label],
            "clicks": click_count,
            "steps_run": update.steps_run,
            "changed_box": None if update.changed_box is None else [list(end) for end in update.changed_box],
            "windows": window_count,
            "voxels": int(np.count_nonzero(mask)),
            "latency_s": round(finished - started, 4),
            "latencies": {
                "pre": round(prepared - started, 4),
                "infer": round(update.predict_s, 4),
                "invert": round(update.to_grid_s, 4),
                "write": round(finished - written, 4),
                "total": round(finished - started, 4),
            },
            "weights": version.partition("@")[0],
        }
        logger.info("mais %s %s (%s): %s", image_path, clicks.label, clicks.owner, result)
        return label_path, result

    def _ohif_target(self, image_path: str, clicked: dict[str, list]) -> str:
        """OHIF sends no `label`: the target is the last label whose click list no stored session has applied."""
        changed = [
            label for label, points in clicked.items() if not self.sessions.positives_applied(image_path, label, points)
        ]
        return (changed or list(clicked))[-1]

    def _new_session(self, image_path: str, model, clicks: ClickRequest) -> InteractiveSession:
        """A session for a request that continues none; a click outside the image is refused before it exists."""
        image = self._prepared(image_path)
        _check_inside(clicks, image.original_shape)
        return InteractiveSession(image, model)

    def _prepared(self, image_path: str) -> ModelSpaceImage:
        """The image in model space; HTTP 422 naming what is wrong when it cannot be read as a 3D volume."""
        try:
            return self._prepared_image(image_path, os.stat(image_path).st_mtime_ns)
        except VolumeError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None

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


def _result_path(extension: str) -> str:
    """A new file in RESULTS_DIR for one click's result. The endpoint deletes it once answered, and MONAI Label's
    client saves the answer under the file's name in the system temporary folder: were the result written there,
    a client on the server's machine would save its copy where the server then deletes it. Names carry a uuid,
    so no two requests share one."""
    RESULTS_DIR.mkdir(mode=0o700, exist_ok=True)
    return str(RESULTS_DIR / f"{uuid.uuid4().hex}-mais-result{extension}")
