"""Interactive evaluation: K simulated clicks per structure through the same session code the server runs.

Each structure gets a fresh `InteractiveSession` (model-space windows, memory, crop following, mask back on the
file's grid) and clicks placed by the shared simulator (lib.clicks.simulator) on the ORIGINAL grid, against the
label file as a user sees it; Dice is measured there too. The click rule is one of the simulator's presets
(`lib.clicks.simulator.CLICK_PRESETS`):
- `center`: interior-most voxel of the object, then of the largest error component (deterministic);
- `random`: a random object voxel, then a random error voxel;
- `noisy`: `center` with Gaussian jitter (1.5 voxels) and 10% wrong-side clicks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from lib.clicks.simulator import POSITIVE, Click, ClickConfig, click_preset, first_click, next_click
from lib.imaging import ModelSpaceImage
from lib.metrics import dice
from lib.session.interactive import InteractiveSession

NOC_THRESHOLDS = (0.80, 0.85, 0.90)
# Errors lie inside the bounding box of truth and prediction: the simulator works on that box plus this margin,
# which keeps distance transforms small on 1 mm whole-brain grids.
BOX_MARGIN = 2


@dataclass
class StructureResult:
    """dice[k - 1] and seconds[k - 1]: Dice after click k and the session time click k took. obeyed[k - 1]:
    whether click k's own voxel lies on its side of the mask after it (None: no click, nothing left to correct);
    a click that leaves its voxel wrong is one an annotator repeats."""

    structure: str
    rule: str
    dice: list[float]
    seconds: list[float]
    obeyed: list[bool | None] = field(default_factory=list)

    def clicks_to_reach(self, threshold: float) -> int:
        """NoC: the first click whose Dice reaches `threshold`, K if none does (capped at K)."""
        return next((k for k, d in enumerate(self.dice, 1) if d >= threshold), len(self.dice))


def evaluate_structure(
    model,
    image: ModelSpaceImage,
    truth: np.ndarray,
    structure: str,
    rule: str,
    clicks: int,
    seed: int = 0,
    session=None,
) -> StructureResult:
    """K clicks on one structure. truth: bool [I, J, K] on the image file's grid, not empty. rule: a name of
    CLICK_PRESETS. session: a fresh object with `add_click` and `mask` to drive instead of the model's
    InteractiveSession (the region-growing baseline)."""
    config = click_preset(rule)
    if not truth.any():
        raise ValueError(f"{structure}: the structure is empty (no voxel of the truth is set)")
    rng = np.random.default_rng(seed)
    session = session if session is not None else InteractiveSession(image, model)
    scores, seconds, obeyed = [], [], []
    for k in range(clicks):
        click = _click(truth, session.mask if k else None, rng, config)
        if click is None:  # nothing left to correct: the mask stays, so does its Dice
            scores.append(scores[-1])
            seconds.append(0.0)
            obeyed.append(None)
            continue
        started = time.perf_counter()
        session.add_click(click)
        seconds.append(time.perf_counter() - started)
        scores.append(dice(session.mask, truth))
        obeyed.append(bool(session.mask[click.coord]) == (click.label == POSITIVE))
    return StructureResult(structure, rule, scores, seconds, obeyed)


def _click(truth: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, config: ClickConfig) -> Click | None:
    """The simulator's click, computed inside the bounding box of truth and mask, in whole-image voxels."""
    voxels = np.argwhere(truth if mask is None else truth | mask)
    lo = np.maximum(voxels.min(0) - BOX_MARGIN, 0)
    hi = np.minimum(voxels.max(0) + BOX_MARGIN + 1, truth.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    if mask is None:
        click = first_click(truth[box], rng, config.first_click, config.noise)
    else:
        click = next_click(truth[box], mask[box], rng, config.next_click, config.noise)
    if click is None:
        return None
    return Click(tuple(int(c) for c in np.asarray(click.coord) + lo), click.label)
