"""Simulated annotators clicking on a real server over HTTP, alone or all at once: shared by
`tests/test_concurrency.py` and `benchmarks/bench_concurrency.py`.

An annotator segments one label of one sample image in Slicer's request shape (a client id, every label's list,
`label`) or OHIF's (no client id, no `label`). Its first click is the structure's interior-most voxel, the same
for every annotator of that structure, so annotators of one structure share a history until their next-click
rules part them: "center" (the largest error's interior, deterministic) or "random" (a voxel of it drawn with the
annotator's own seed). Alone (`click_alone`) an annotator's clicks follow its masks; the recorded requests are then
sent again by every annotator at once (`click_together`), and each answer must be the mask it got alone.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import nrrd
import numpy as np
import requests
from monai.transforms import LoadImage

from lib.clicks.simulator import POSITIVE, Click, ClickRule, first_click, next_click
from lib.configs.labels import SAMPLE_LABELS

# (image id, file name, label): a 512x512x48 CT, an anisotropic non-RAS MR, a small structure of a brain MR
STRUCTURES = [
    ("lung1", "lung1.nii.gz", "lesion"),
    ("brain1", "brain1.nrrd", "lesion"),
    ("colin27_t1", "colin27_t1.nii.gz", "thalamus_left"),
]
REQUEST_TIMEOUT_S = 300


@dataclass(frozen=True)
class Annotator:
    name: str
    shape: str  # "slicer" or "ohif"
    structure: tuple[str, str, str]  # one of STRUCTURES
    next_rule: str  # "center" or "random"
    seed: int  # of the next clicks: "center" breaks ties of the interior with it


@dataclass
class Request:
    """One request of an annotator: the full history it sent and the mask [I, J, K] uint8 it got back alone."""

    positives: list[list[int]]
    negatives: list[list[int]]
    mask: np.ndarray


@dataclass
class Outcome:
    """What the annotators got together: seconds per answered request, errors, masks unlike the lone ones."""

    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)


def team(count: int) -> list[Annotator]:
    """`count` annotators over the structures in turn, Slicer and OHIF alternating. The first of each structure
    and every sixth click by the deterministic rule (annotators 0 and 6 share their whole history), the others
    at random with their own seed (they part from the others of their structure after the first click)."""
    team = []
    for n in range(count):
        deterministic = n < len(STRUCTURES) or n % 6 == 0
        shape, structure = "slicer" if n % 2 == 0 else "ohif", STRUCTURES[n % len(STRUCTURES)]
        rule, seed = ("center", 0) if deterministic else ("random", n)
        team.append(Annotator(f"annotator-{n}", shape, structure, rule, seed))
    return team


def send(url: str, annotator: Annotator, positives, negatives) -> tuple[float, np.ndarray]:
    """One request with the annotator's whole history in its client's shape; (seconds, mask uint8 [I, J, K])."""
    image, _, label = annotator.structure
    params = {label: positives, "background": negatives, "result_extension": ".nrrd", "result_dtype": "uint8"}
    if annotator.shape == "slicer":
        params = {**{name: [] for name in SAMPLE_LABELS}, **params, "label": label, "client_id": annotator.name}
    started = time.perf_counter()
    response = requests.post(
        f"{url}/infer/mais",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(params))},
        timeout=REQUEST_TIMEOUT_S,
    )
    seconds = time.perf_counter() - started
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
    with tempfile.NamedTemporaryFile(suffix=".nrrd") as result:
        result.write(response.content)
        result.flush()
        # the voxels in the file's [I, J, K] order, as LoadImage gives them, in a fiftieth of its time
        return seconds, np.asarray(nrrd.read(result.name, index_order="F")[0]).astype(np.uint8)


def boxed_next_click(gt: np.ndarray, mask: np.ndarray, rng: np.random.Generator, rule: ClickRule = "center"):
    """next_click on the bounding box of `gt | mask` (grown by a voxel): every error voxel is inside it, and the
    simulator's components, depths, voxel order and so its draws are those of the whole volume, so the click is
    the same (tests/test_annotators.py compares the two). On a 512 x 512 x 300 CT it takes a fraction of a second
    instead of several: only the two boxes are compared, never the whole volumes, which may differ in memory
    order (a mask read from NRRD is [I, J, K] in Fortran order, a label from NIfTI in either)."""
    if gt.shape != mask.shape:
        raise ValueError(f"gt and mask must have one shape, got {gt.shape} and {mask.shape}")
    box = _bounding_box(gt, mask)
    if box is None:
        return None  # no error: both are empty
    click = next_click(np.ascontiguousarray(gt[box]), np.ascontiguousarray(mask[box]), rng, rule=rule)
    if click is None:
        return None
    return Click(tuple(int(c) + s.start for c, s in zip(click.coord, box)), click.label)


def _bounding_box(*masks: np.ndarray) -> tuple[slice, ...] | None:
    """The slices of the box holding every True voxel of `masks` (bool, one shape), grown by a voxel; None if none."""
    shape = masks[0].shape
    box = []
    for axis in range(len(shape)):
        others = tuple(a for a in range(len(shape)) if a != axis)
        present = np.flatnonzero(np.logical_or.reduce([m.any(axis=others) for m in masks]))
        if present.size == 0:
            return None
        box.append(slice(max(int(present[0]) - 1, 0), min(int(present[-1]) + 2, shape[axis])))
    return tuple(box)


def click_alone(url: str, studies: Path, annotator: Annotator, clicks: int) -> tuple[list[Request], list[float]]:
    """The annotator alone: `clicks` requests, each next click placed on the error of the mask it got back.
    Returns its requests with their masks, and the seconds of each."""
    _, file_name, label = annotator.structure
    truth = np.asarray(LoadImage(image_only=True)(str(studies / "labels" / "final" / file_name)))
    truth = truth == SAMPLE_LABELS[label]
    positives, negatives, made, seconds = [], [], [], []
    click = first_click(truth, np.random.default_rng(0))  # one seed for all: ties of the interior broken alike
    rng = np.random.default_rng(annotator.seed)
    for _ in range(clicks):
        (positives if click.label == POSITIVE else negatives).append([int(v) for v in click.coord])
        elapsed, mask = send(url, annotator, list(positives), list(negatives))
        made.append(Request(list(positives), list(negatives), mask))
        seconds.append(elapsed)
        click = boxed_next_click(truth, mask > 0, rng, rule=annotator.next_rule)
        if click is None:
            break
    return made, seconds


def click_together(url: str, plans: dict[Annotator, list[Request]], outcome: Outcome | None = None) -> Outcome:
    """Every annotator sends its requests in order, all at once (a thread each, started together); each answer
    is compared bit for bit with the mask the annotator got alone. Recorded in `outcome` when given (a caller
    interrupted meanwhile keeps what was answered), else in a new one."""
    outcome = Outcome() if outcome is None else outcome
    lock = threading.Lock()
    start = threading.Barrier(len(plans))

    def annotate(annotator: Annotator, made: list[Request]) -> None:
        start.wait()
        for step, request in enumerate(made, start=1):
            try:
                seconds, mask = send(url, annotator, request.positives, request.negatives)
            except Exception as error:  # counted and reported: one failing request must not hide the others
                with lock:
                    outcome.errors.append(f"{annotator.name} click {step}: {error}")
                continue
            with lock:
                outcome.latencies.append(seconds)
                if not np.array_equal(mask, request.mask):
                    differing = int(np.count_nonzero(mask != request.mask))
                    outcome.mismatches.append(f"{annotator.name} click {step}: {differing} voxels differ")

    threads = [threading.Thread(target=annotate, args=item) for item in plans.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcome
