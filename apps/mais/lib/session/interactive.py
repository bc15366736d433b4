"""One user segmenting one label on one image: the clicks so far, the memory they built, the current mask.

Each click is one interaction step, in arrival order: the model sees every click inside the crop window so far
(only the new click when its config.prompt_clicks is "latest"), the window's previous low-res logits and the
window's memory bank of earlier steps; the step's memory entry is then pushed (the same order as
`lib.training.interaction_loop`). A click far from the current window (or outside it) opens a window centred on
it, seeded with the mask predicted so far, so a structure larger than one 128^3 crop (192 mm) is segmented window
by window instead of being cut at the crop border.

Undo and lost state are the same operation: `replay` rebuilds everything from a click list, which is also what
happens after a server restart, because clients resend their full history with every request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lib.clicks.simulator import Click
from lib.imaging import BACKGROUND_LOGIT, CROP_MARGIN, CROP_SIZE, CropWindow, ModelSpaceImage

LOW_RES_SIZE = 32  # the mask decoder's output grid (128 / 4)
# A mask with fewer voxels than this on a window face is a touch, not a structure running on: not followed.
MIN_BORDER_VOXELS = 20
# The point that seeds a neighbouring window sits this deep inside the face (model voxels, 1.5 mm), where the
# mask is still well defined.
BORDER_POINT_DEPTH = 4


@dataclass
class _Window:
    """A crop window's own state: its image embedding [1, C, 8, 8, 8], memory bank and last low-res logits."""

    crop: CropWindow
    image_embedding: Tensor
    memory: object  # lib.model MemoryBank
    low_res_logits: Tensor | None = None
    positive_box: tuple[np.ndarray, np.ndarray] | None = None  # model-space [lo, hi) of the last positive logits


@dataclass
class InteractiveSession:
    """State of one interaction session. Not thread-safe: the session store serialises access."""

    image: ModelSpaceImage
    model: torch.nn.Module
    clicks: list[Click] = field(default_factory=list)
    windows: list[_Window] = field(default_factory=list)
    logits: Tensor | None = None  # [1, X, Y, Z] float16 model-space logits so far, on the model's device
    mask: np.ndarray | None = None  # [I, J, K] bool on the original grid

    def __post_init__(self) -> None:
        self.reset()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def reset(self) -> None:
        """Forget every click, window and mask (the image and its model-space volume stay)."""
        self.clicks, self.windows = [], []
        self.logits = torch.full((1, *self.image.shape), BACKGROUND_LOGIT, dtype=torch.float16, device=self.device)
        self.mask = np.zeros(self.image.original_shape, dtype=bool)

    def replay(self, clicks: list[Click]) -> None:
        """Rebuild the session from scratch by applying `clicks` in order (undo, expired or restarted state)."""
        self.reset()
        for click in clicks:
            self.add_click(click)

    @torch.inference_mode()
    def add_click(self, click: Click) -> None:
        """One interaction step: predict with this click and the memory of the earlier ones; update the mask."""
        self.clicks.append(click)
        model_points = self.image.to_model_voxels(np.array([c.coord for c in self.clicks]))  # [N, 3]
        window = self._window_for(model_points[-1])
        inside = np.array([window.crop.contains(point) for point in model_points])
        if self.model.config.prompt_clicks == "latest":
            inside[:-1] = False
        point_coords = torch.from_numpy(window.crop.to_local(model_points[inside])).to(self.device)[None]  # [1, P, 3]
        labels = [c.label for c, keep in zip(self.clicks, inside) if keep]
        point_labels = torch.tensor([labels], device=self.device)  # [1, P]
        window_logits = self._step(window, point_coords, point_labels)
        neighbour = self._neighbour_across_border(window, window_logits)
        if neighbour is not None:
            self._step(*neighbour, keep=window.crop)

    def _step(
        self, window: _Window, point_coords: Tensor, point_labels: Tensor, keep: CropWindow | None = None
    ) -> Tensor:
        """Predict in `window` with these points [1, P, 3] / [1, P], its memory and last logits; push the step's
        memory entry and update the mask. Where `keep` overlaps, the logits so far stay (an extension adds to
        the clicked window's prediction, it does not overwrite it). Returns the window's logits [1, 128^3]."""
        output = self.model.predict(
            window.image_embedding, point_coords, point_labels, window.low_res_logits, window.memory
        )
        window.memory.push(output.memory_entry)
        window.low_res_logits = output.low_res_logits
        window_logits = self.model.upsample_logits(output.low_res_logits)[0].float()  # [1, 128, 128, 128]
        if keep is not None:
            kept = (slice(None), *window.crop.overlap(keep))
            window_logits[kept] = window.crop.extract(self.logits, fill=BACKGROUND_LOGIT)[kept].float()
        window.crop.paste(self.logits, window_logits.half())
        self._update_mask(window, window_logits)
        return window_logits

    def _neighbour_across_border(self, window: _Window, window_logits: Tensor) -> tuple | None:
        """Where the mask runs into a face of the window behind which the image goes on, the window half a crop
        further that way, with a positive point on the mask just inside that face (in the neighbour's
        coordinates): (window, point_coords, point_labels). None when the mask stays inside or a window is there.

        Once per click at most, so a click costs at most two steps; the structure is followed further by the
        next click, as the clicks beyond a window open their own (see `_window_for`).
        """
        positive = window_logits[0] > 0  # [128, 128, 128]
        start = np.asarray(window.crop.start)
        best = None
        for axis in range(3):
            for side, index in ((-1, 0), (1, CROP_SIZE - 1)):
                image_goes_on = start[axis] > 0 if side < 0 else start[axis] + CROP_SIZE < self.image.shape[axis]
                touching = int(positive.select(axis, index).sum()) if image_goes_on else 0
                if touching >= MIN_BORDER_VOXELS and (best is None or touching > best[0]):
                    best = (touching, axis, side, index)
        if best is None:
            return None
        _, axis, side, index = best
        centre = start + CROP_SIZE // 2
        centre[axis] += side * CROP_SIZE // 2
        crop = CropWindow.around(centre, self.image.shape)
        if any(other.crop == crop for other in self.windows):
            return None
        # the positive voxel nearest the middle of the mask's crossing, a few voxels inside the face
        inner = index - side * BORDER_POINT_DEPTH
        crossing = torch.nonzero(positive.select(axis, inner)).cpu().numpy()
        if not len(crossing):
            return None
        nearest = crossing[np.argmin(np.abs(crossing - crossing.mean(0)).sum(1))]
        point = np.insert(nearest, axis, inner) + start
        neighbour = self._open_window(crop)
        point_coords = torch.from_numpy(crop.to_local(point[None])).to(self.device)[None]  # [1, 1, 3]
        point_labels = torch.ones((1, 1), dtype=torch.long, device=self.device)
        return neighbour, point_coords, point_labels

    def _update_mask(self, window: _Window, window_logits: Tensor) -> None:
        """Bring the original-grid mask up to date where this step's or the window's previous positives lie."""
        positive = torch.nonzero(window_logits[0] > 0).cpu()
        new_box = None
        if len(positive):
            start = np.asarray(window.crop.start)
            lo = np.maximum(positive.min(0).values.numpy() + start - 1, 0)
            hi = np.minimum(positive.max(0).values.numpy() + start + 2, self.image.shape)
            new_box = (lo, hi)
        boxes = [box for box in (new_box, window.positive_box) if box is not None]
        window.positive_box = new_box
        if not boxes:
            return
        lo = np.min([box[0] for box in boxes], axis=0)
        hi = np.max([box[1] for box in boxes], axis=0)
        original_box, box_mask = self.image.to_original_grid(self.logits, lo, hi)
        self.mask[original_box] = box_mask

    def _window_for(self, point: np.ndarray) -> _Window:
        """The window a click at model-space `point` [3] is predicted in; opens a new one where none fits."""
        for window in reversed(self.windows):  # the most recent window first: it holds the newest context
            if window.crop.contains(point, margin=CROP_MARGIN):
                return window
        return self._open_window(CropWindow.around(point, self.image.shape))

    def _open_window(self, crop: CropWindow) -> _Window:
        """A new window: its image embedding, an empty memory, and as previous mask what other windows found."""
        volume = crop.extract(self.image.volume, fill=self.image.pad_value)[None].to(self.device)
        window = _Window(crop, self.model.embed_image(volume), self.model.new_memory(batch_size=1))
        if self.windows:  # continue from what earlier windows predicted here
            seed = crop.extract(self.logits.float(), fill=BACKGROUND_LOGIT)[None]  # [1, 1, 128, 128, 128]
            if (seed > 0).any():
                window.low_res_logits = F.interpolate(seed, size=(LOW_RES_SIZE,) * 3, mode="trilinear").to(self.device)
        self.windows.append(window)
        return window

    @property
    def nbytes(self) -> int:
        """Memory this session holds besides the shared model (image volume counted, as it is cached per image)."""
        total = self.image.nbytes + self.logits.numel() * self.logits.element_size() + self.mask.nbytes
        for window in self.windows:
            total += window.image_embedding.numel() * window.image_embedding.element_size()
            total += window.memory.nbytes()
        return total
