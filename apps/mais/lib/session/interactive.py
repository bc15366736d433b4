"""One user segmenting one label on one image: the clicks so far, the memory they built, the current mask.

Each click is one interaction step (`lib.model.interaction`, the step the training loop runs), in arrival
order: the step sees every click inside the crop window so far (only the new click when the model's
config.prompt_clicks is "latest"), the window's previous low-res logits and the window's memory bank of earlier
steps. A click far from the current window (or outside it) opens a window centred on it, seeded with the mask
predicted so far, so a structure larger than one 128^3 crop (96 mm at 0.75 mm) is segmented window by window
instead of being cut at the crop border. The mask keeps only its connected parts that hold a positive click
(`_keep_clicked_parts`).

A request brings the segment's full click history: `apply` orders it by the clicks the session has applied
(`lib.clicks.history.common_prefix`, as the session store does before `advance`, which takes it ordered); either
runs only the new clicks. Undo and lost state are the same operation: a history that does not begin with the
applied clicks is replayed from scratch, which is also what happens after a server restart or on another replica,
because clients resend their full history with every request.

Click coordinates here are voxel indices [i, j, k] of the ORIGINAL image file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lib.clicks.history import Voxel, common_prefix
from lib.clicks.simulator import POSITIVE, Click, parts_holding
from lib.imaging import BACKGROUND_LOGIT, CROP_MARGIN, CROP_SIZE, CropWindow, ModelSpaceImage
from lib.model.interaction import InteractionState

LOW_RES_SIZE = 32  # the mask decoder's output grid (128 / 4)
# A mask with fewer voxels than this on a window face is a touch, not a structure running on: not followed.
MIN_BORDER_VOXELS = 20
# The point that seeds a neighbouring window sits this deep inside the face (model voxels), where the
# mask is still well defined.
BORDER_POINT_DEPTH = 4


@dataclass
class _Window:
    """A crop window's own state: its image [1, 1, 128, 128, 128] (kept for a model with the refinement head,
    which sees it; None without one) and embedding [1, C, 8, 8, 8], its interaction (memory bank and last
    low-res logits) and the model-space [lo, hi) box of its last positive logits."""

    crop: CropWindow
    volume: Tensor | None
    image_embedding: Tensor
    interaction: InteractionState
    positive_box: tuple[np.ndarray, np.ndarray] | None = None


@dataclass(frozen=True)
class SessionUpdate:
    """What one `InteractiveSession.apply` changed.

    steps_run: interaction steps run (the new clicks, or every click of a replay). changed_box: the
    ([i, j, k] lo, hi) box of the original grid outside which the mask is as before, None if nothing changed.
    predict_s: seconds spent predicting; to_grid_s: seconds spent resampling logits back onto the original grid.
    """

    steps_run: int
    changed_box: tuple[tuple[int, int, int], tuple[int, int, int]] | None
    predict_s: float
    to_grid_s: float


class InteractiveSession:
    """State of one interaction session. Not thread-safe: the session store serialises access.

    image: the image in model space (shared read-only with other sessions of it). model: the shared `Mais`.
    clicks: the applied clicks, arrival order. windows: the crop windows opened so far. logits [1, X, Y, Z]
    float16 model-space logits so far, on the model's device. mask [I, J, K] bool on the original grid.
    """

    def __init__(self, image: ModelSpaceImage, model: torch.nn.Module):
        self.image = image
        self.model = model
        self.clicks: list[Click] = []
        self.windows: list[_Window] = []
        self.logits: Tensor
        self.mask: np.ndarray
        self._to_grid_s = 0.0  # time spent in `to_original_grid` since the last `apply` began
        self._changed: tuple[np.ndarray, np.ndarray] | None = None  # original-grid box changed since then
        self.reset()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def apply(self, positives: Sequence[Voxel], negatives: Sequence[Voxel], reset: bool = False) -> SessionUpdate:
        """Bring the session up to a request's full click history (original voxels [i, j, k], each list in
        arrival order): only clicks not yet applied run, unless a click was removed (then the rest is replayed).
        reset starts afresh first."""
        prefix, rest = common_prefix([] if reset else self.clicks, positives, negatives)
        return self.advance(prefix + rest, reset)

    def advance(self, history: list[Click], reset: bool = False) -> SessionUpdate:
        """Bring the session to `history`, all its clicks in arrival order: the clicks beyond the applied ones run
        when it begins with them; otherwise (or with reset) the session starts afresh and replays all of it."""
        started = time.perf_counter()
        self._to_grid_s, self._changed = 0.0, None
        if reset or history[: len(self.clicks)] != self.clicks:
            self.reset()
        new = history[len(self.clicks) :]
        for click in new:
            self.add_click(click)
        changed = None if self._changed is None else tuple(tuple(int(v) for v in end) for end in self._changed)
        elapsed = time.perf_counter() - started
        return SessionUpdate(len(new), changed, elapsed - self._to_grid_s, self._to_grid_s)

    def reset(self) -> None:
        """Forget every click, window and mask (the image and its model-space volume stay)."""
        if self.clicks:  # the whole mask may go
            self._mark_changed(np.zeros(3, dtype=int), np.asarray(self.image.original_shape))
        self.clicks, self.windows = [], []
        self.logits = torch.full((1, *self.image.shape), BACKGROUND_LOGIT, dtype=torch.float16, device=self.device)
        # Fortran order: ITK's writer (MONAI Label's, for every NRRD result) copies the mask transposed, which is a
        # plain memory copy for this layout and a strided one for C order (512x512x300: 0.1 s against 0.9 s, CPU)
        self.mask = np.zeros(self.image.original_shape, dtype=bool, order="F")

    @torch.inference_mode()
    def add_click(self, click: Click) -> None:
        """One interaction step: predict with this click and the memory of the earlier ones; update the mask."""
        self.clicks.append(click)
        model_points = self.image.to_model_voxels(np.array([c.coord for c in self.clicks]))  # [N, 3]
        window = self._window_for(model_points[-1])
        inside = np.array([window.crop.contains(point) for point in model_points])
        click_coords = torch.from_numpy(window.crop.to_local(model_points[inside])).to(self.device)[None]  # [1, N, 3]
        labels = [c.label for c, keep in zip(self.clicks, inside) if keep]
        click_labels = torch.tensor([labels], device=self.device)  # [1, N]
        window_logits = self._step(window, click_coords, click_labels)
        neighbour = self._neighbour_across_border(window, window_logits)
        if neighbour is not None:
            self._step(*neighbour, keep=window.crop)
        self._keep_clicked_parts()

    def _keep_clicked_parts(self) -> None:
        """Drop the parts of the mask (connected components) that no positive click lies in: what the user
        clicked is what they segment, and an island the network draws elsewhere (a neighbouring structure of
        similar intensity) is not theirs. When no positive click lies on the mask at all, the mask stays as
        the network drew it. Measured on the 17 unseen held-out structures (run 14, centre clicks): Dice after
        1 / 5 / 10 clicks 0.332 / 0.541 / 0.592 without, 0.350 / 0.565 / 0.605 with (breast1's lesion at the
        first click 0.44 -> 0.61); benchmarks/results/generalist/README.md.

        The logits keep the dropped parts, so a part that a later step joins to a clicked one comes back: it
        lies in its window's box of positive logits, which that step resamples."""
        # the mask is set only inside the windows' boxes of positive logits: label there, not the whole grid
        boxes = [self.image.original_box(*w.positive_box) for w in self.windows if w.positive_box is not None]
        positives = np.array([c.coord for c in self.clicks if c.label == POSITIVE])
        if not boxes or not len(positives):
            return
        lo = np.min([[b.start for b in box] for box in boxes], axis=0)
        hi = np.max([[b.stop for b in box] for box in boxes], axis=0)
        in_box = self.mask[tuple(slice(a, b) for a, b in zip(lo, hi))]  # a view: writing it writes the mask
        clicked = parts_holding(in_box, positives[np.all((positives >= lo) & (positives < hi), axis=1)] - lo)
        if not clicked.any():
            return
        dropped = in_box & ~clicked
        if dropped.any():
            in_box[dropped] = False
            self._mark_changed(lo, hi)

    def _step(
        self, window: _Window, click_coords: Tensor, click_labels: Tensor, keep: CropWindow | None = None
    ) -> Tensor:
        """One interaction step in `window` with these clicks [1, N, 3] / [1, N] (window voxels, the newest
        last), then the mask update. Where `keep` overlaps, the logits so far stay (an extension adds to the
        clicked window's prediction, it does not overwrite it). Returns the window's logits [1, 128^3]."""
        output = window.interaction.step(self.model, window.image_embedding, window.volume, click_coords, click_labels)
        window_logits = output.logits[0].float()  # [1, 128, 128, 128]
        if keep is not None:
            kept = (slice(None), *window.crop.overlap(keep))
            window_logits[kept] = window.crop.extract(self.logits, fill=BACKGROUND_LOGIT)[kept].float()
        window.crop.paste(self.logits, window_logits.half())
        self._update_mask(window, window_logits)
        return window_logits

    def _neighbour_across_border(self, window: _Window, window_logits: Tensor) -> tuple | None:
        """Where the mask runs into a face of the window behind which the image goes on, the window half a crop
        further that way, with a positive point on the mask just inside that face (in the neighbour's
        coordinates): (window, click_coords, click_labels). None when the mask stays inside or a window is there.

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
        click_coords = torch.from_numpy(crop.to_local(point[None])).to(self.device)[None]  # [1, 1, 3]
        click_labels = torch.ones((1, 1), dtype=torch.long, device=self.device)
        return neighbour, click_coords, click_labels

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
        started = time.perf_counter()
        original_box, box_mask = self.image.to_original_grid(self.logits, lo, hi)
        self._to_grid_s += time.perf_counter() - started
        self.mask[original_box] = box_mask
        self._mark_changed(np.array([b.start for b in original_box]), np.array([b.stop for b in original_box]))

    def _mark_changed(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Grow the changed box of the current `apply` by the original-grid box [lo, hi)."""
        if self._changed is not None:
            lo, hi = np.minimum(lo, self._changed[0]), np.maximum(hi, self._changed[1])
        self._changed = (lo, hi)

    def _window_for(self, point: np.ndarray) -> _Window:
        """The window a click at model-space `point` [3] is predicted in; opens a new one where none fits."""
        for window in reversed(self.windows):  # the most recent window first: it holds the newest context
            if window.crop.contains(point, margin=CROP_MARGIN):
                return window
        return self._open_window(CropWindow.around(point, self.image.shape))

    def _open_window(self, crop: CropWindow) -> _Window:
        """A new window: its image embedding, an empty memory, and as previous mask what other windows found."""
        volume = crop.extract(self.image.volume, fill=self.image.pad_value)[None].to(self.device)
        kept_volume = volume if self.model.config.refinement else None  # 8 MB a window, for the head only
        window = _Window(
            crop, kept_volume, self.model.embed_image(volume), InteractionState.start(self.model, volume=volume)
        )
        if self.windows:  # continue from what earlier windows predicted here
            seed = crop.extract(self.logits.float(), fill=BACKGROUND_LOGIT)[None]  # [1, 1, 128, 128, 128]
            if (seed > 0).any():
                low_res_seed = F.interpolate(seed, size=(LOW_RES_SIZE,) * 3, mode="trilinear")
                window.interaction.low_res_logits = low_res_seed.to(self.device)
        self.windows.append(window)
        return window

    @property
    def nbytes(self) -> int:
        """Memory this session holds besides the shared model (image volume counted, as it is cached per image)."""
        return sum(self.nbytes_by_part().values())

    def nbytes_by_part(self) -> dict[str, int]:
        """`nbytes` by what holds it: the image in model space, the logits, the mask, and the windows' volumes,
        embeddings (with their high-resolution features or cells, for a model with them), memories and last
        low-res logits (summed over the windows)."""
        windows = self.windows
        return {
            "image": self.image.nbytes,
            "logits": _tensor_bytes(self.logits),
            "mask": self.mask.nbytes,
            "window volumes": sum(_tensor_bytes(w.volume) for w in windows),
            "window embeddings": sum(
                _tensor_bytes(w.image_embedding) + _tensor_bytes(w.interaction.high_res) for w in windows
            ),
            "window memories": sum(w.interaction.memory.nbytes() for w in windows),
            "window low-res logits": sum(_tensor_bytes(w.interaction.low_res_logits) for w in windows),
        }


def _tensor_bytes(tensors: Tensor | tuple[Tensor, ...] | None) -> int:
    """Bytes of a tensor, of a tuple of them (a window's high-resolution features), 0 for None."""
    if isinstance(tensors, tuple):
        return sum(map(_tensor_bytes, tensors))
    return 0 if tensors is None else tensors.numel() * tensors.element_size()
