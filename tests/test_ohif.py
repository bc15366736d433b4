"""The OHIF viewer that ships inside MONAI Label (`/ohif/`), driven in headless Chromium against the PACS setup of
test_dicomweb.py (conftest.py's `orthanc` and `pacs_server`, a copy of its own): study list, MONAI Label mode, the
MONAI Label panel, a first point prompt and corrective ones placed from the ground truth, a second annotator on the
same study, saving the label as a DICOM SEG in Orthanc, Update Model and Next Sample in Active Learning.

Needs Debian's `chromium` and `playwright-core` from tests/ohif/package-lock.json (`npm ci` there); `.ci/run`
installs both. No browser is downloaded: Playwright drives /usr/bin/chromium. Screenshots of every step and the
browser's own record (result.json: steps, console errors, failed requests, the panel's requests; the labelmaps
OHIF showed) land in the test's tmp folder, printed at the start. What the bundled OHIF does and does not do with
this app: docs/OHIF.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom_seg
import pytest
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from monai.transforms import LoadImage
from PIL import Image
from scipy import ndimage

from clicking import BRAIN1_LESION_MIN_DICE, dice, interior_voxel
from server import REPO_ROOT, SAMPLE_DATA

OHIF_DIR = REPO_ROOT / "tests" / "ohif"
LESION_LABEL = SAMPLE_DATA / "labels" / "final" / "brain1.nrrd"
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])
# Messages the bundled OHIF always produces here, none of them a failure of this app:
# - it asks fonts.googleapis.com for a web font; the session blocks every request that leaves the server;
# - the MONAI Label panel asks `GET /train/?check_if_running=true` on connect, which MONAI Label answers 404 while
#   no training runs (monailabel/endpoints/train.py).
EXPECTED_HTTP_ERRORS = {"404 GET {server}/train/?check_if_running=true"}

# The corrective clicks after the first one, in order: a negative click on a false positive far from the lesion
# (on the first click's slice, where the annotator looks), then a positive one on what the mask still misses.
CORRECTIONS = ("background", "lesion")
# smaller false-positive specks are not worth a click
MIN_ERROR_PIXELS = 10
# the strategy the annotator picks in the Active Learning tab
STRATEGY = "mais_uncertain"
# the whole browser session: the first click alone took 47 s on 2 busy cores, each later step seconds to a minute
SESSION_TIMEOUT_S = 900

pytestmark = [pytest.mark.browser, pytest.mark.pacs, pytest.mark.server]


@pytest.fixture(scope="module")
def lesion_click_world() -> np.ndarray:
    """The lesion's deepest voxel of brain1 in patient LPS mm, the coordinates cornerstone3D works in."""
    label = LoadImage(image_only=True, ensure_channel_first=True)(str(LESION_LABEL))
    ras = np.asarray(label.affine) @ np.array([*interior_voxel(LESION_LABEL, 1), 1])
    return LPS_FROM_RAS @ ras[:3]


@pytest.fixture(scope="module")
def lesion_world() -> np.ndarray:
    """Every ground-truth lesion voxel of brain1 in patient LPS mm, [N, 3]."""
    label = LoadImage(image_only=True, ensure_channel_first=True)(str(LESION_LABEL))
    voxels = np.argwhere(np.asarray(label)[0] == 1)
    return (LPS_FROM_RAS @ (np.asarray(label.affine) @ np.c_[voxels, np.ones(len(voxels))].T)[:3]).T


class Labelmap:
    """A labelmap.json of the session: OHIF's labelmap (what its overlay shows) with its grid."""

    def __init__(self, path: Path):
        shown = json.loads(path.read_text())
        self.shape = tuple(shown["dimensions"])  # (nx, ny, nz)
        self.origin = np.asarray(shown["origin"], float)
        self.spacing = np.asarray(shown["spacing"], float)
        self.axes = np.asarray(shown["direction"], float).reshape(3, 3).T * self.spacing  # columns: i, j, k in mm
        self.other_voxels = shown["otherVoxels"]
        self.flat_voxels = shown["voxels"]
        self.mask = self.from_flat(shown["voxels"])

    def from_flat(self, flat) -> np.ndarray:
        """[i, j, k] bool array of flat indices i + j * nx + k * nx * ny (OHIF's order, x fastest)."""
        mask = np.zeros(int(np.prod(self.shape)), bool)
        mask[flat] = True
        return mask.reshape(self.shape[::-1]).transpose(2, 1, 0)

    def index(self, world: np.ndarray) -> np.ndarray:
        """Nearest [i, j, k] of LPS points [N, 3]."""
        return np.rint(np.linalg.solve(self.axes, (np.atleast_2d(world) - self.origin).T).T).astype(int)

    def world(self, ijk) -> list[float]:
        return (self.origin + self.axes @ np.asarray(ijk, float)).tolist()

    def truth(self, lesion_world: np.ndarray) -> np.ndarray:
        """The ground-truth lesion moved onto this grid through world coordinates."""
        ijk = self.index(lesion_world)
        assert (ijk >= 0).all() and (ijk < self.shape).all(), "the lesion lies outside OHIF's volume"
        truth = np.zeros(self.shape, bool)
        truth[tuple(ijk.T)] = True
        return truth


def correction_click(kind: str, mask: np.ndarray, truth: np.ndarray, k: int, spacing) -> list[int]:
    """Where an annotator corrects the mask, on the voxel deepest inside the error (people click the middle of what
    they fix): "background" (negative) on the axial slice k they look at, on the false positive lying farthest
    from the lesion (an island the first click grew where there is no lesion); "lesion" (positive) on the largest
    part of the lesion the mask misses, on whichever slice it is (the mask of one click misses most on the slices
    above and below it)."""
    if kind == "background":
        lesion = truth[:, :, k]
        from_lesion = ndimage.distance_transform_edt(~lesion, sampling=spacing[:2])
        islands, count = ndimage.label(mask[:, :, k] & ~lesion)
        candidates = [c for c in range(1, count + 1) if (islands == c).sum() >= MIN_ERROR_PIXELS]
        assert candidates, f"the mask has no false positive on slice {k} to correct"
        region = islands == max(candidates, key=lambda c: from_lesion[islands == c].max())
        depth = ndimage.distance_transform_edt(region, sampling=spacing[:2])
        return [*map(int, np.unravel_index(np.argmax(depth), depth.shape)), k]
    missed = truth & ~mask
    parts, count = ndimage.label(missed)
    assert count, "the mask misses no part of the lesion"
    region = parts == 1 + int(np.argmax(ndimage.sum(missed, parts, range(1, count + 1))))
    depth = ndimage.distance_transform_edt(region, sampling=spacing)
    return [int(v) for v in np.unravel_index(np.argmax(depth), depth.shape)]


@pytest.fixture(scope="module")
def session(pacs_server, lesion_click_world, lesion_world, tmp_path_factory) -> dict:
    """Runs tests/ohif/ohif_session.js once, placing its corrective clicks from the masks it shows; returns its
    result.json plus `out` (the artifact folder) and the labelmaps."""
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    node = shutil.which("node")
    assert Path(chromium).exists(), "Chromium is not installed: apt-get install chromium"
    assert node, "Node.js is not installed: apt-get install nodejs npm"
    assert (OHIF_DIR / "node_modules" / "playwright-core").is_dir(), "playwright-core missing: cd tests/ohif && npm ci"
    out = tmp_path_factory.mktemp("ohif")
    print(f"\nOHIF screenshots and browser record: {out}")
    config = {
        "server": pacs_server.url,
        "patient": "MAIS, brain1",
        "label": "lesion",
        "world": lesion_click_world.tolist(),
        "corrections": len(CORRECTIONS),
        "strategy": STRATEGY,
        "out": str(out),
        "chromium": chromium,
    }
    (out / "config.json").write_text(json.dumps(config))
    deadline = time.monotonic() + SESSION_TIMEOUT_S
    with open(out / "node.log", "w") as log:
        browser = subprocess.Popen(
            [node, str(OHIF_DIR / "ohif_session.js"), str(out / "config.json")], cwd=OHIF_DIR, stderr=log
        )
    try:
        # the session waits for each corrective click; it is placed from the mask OHIF shows after the last Run
        for n in range(2, len(CORRECTIONS) + 2):
            shown = out / f"labelmap_{n - 1}.json"
            while not shown.exists() and browser.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if not shown.exists():
                break
            labelmap = Labelmap(shown)
            k = int(labelmap.index(lesion_click_world)[0, 2])
            kind = CORRECTIONS[n - 2]
            ijk = correction_click(kind, labelmap.mask, labelmap.truth(lesion_world), k, labelmap.spacing)
            (out / f"click_{n}.tmp").write_text(json.dumps({"label": kind, "world": labelmap.world(ijk)}))
            (out / f"click_{n}.tmp").rename(out / f"click_{n}.json")  # appears whole to the waiting session
        browser.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        if browser.poll() is None:
            browser.kill()
            browser.wait()
        # a run the session started and could not stop would keep both cores busy for the other tests
        requests.delete(f"{pacs_server.url}/train/", timeout=30)
    assert browser.returncode == 0 and (out / "result.json").exists(), (
        f"the browser session crashed:\n{(out / 'node.log').read_text()}"
    )
    result = json.loads((out / "result.json").read_text())
    for name, record in result["steps"].items():
        print(f"{name}: {'ok' if record['ok'] else 'FAILED'} in {record['seconds']:.1f} s")
    return {**result, "out": out, "server": pacs_server.url}


def step(session: dict, name: str) -> dict:
    """One step's record; fails with the browser's error when the step (or an earlier one) did not pass."""
    record = session["steps"].get(name)
    assert record is not None, f"step {name!r} did not run; steps: {session['steps']}"
    errors = [m for m in session["console"] if m.startswith("error:")] + session["pageErrors"]
    assert record["ok"], (
        f"step {name!r} failed (screenshots in {session['out']}):\n{record['error']}\nbrowser errors: {errors}"
    )
    return record


def test_study_list_shows_the_sample_studies(session):
    assert set(step(session, "study_list")["patients"]) == {"MAIS, brain1", "MAIS, lung1"}


def test_viewer_opens_the_series_in_monai_label_mode(session, series):
    viewer = step(session, "open_viewer")
    assert "MONAI Label" in viewer["modes"]
    assert "/ohif/monai-label?StudyInstanceUIDs=" in viewer["url"]
    assert viewer["seriesInstanceUID"] == series["brain1"]
    assert (viewer["modality"], viewer["frames"], viewer["dimensions"]) == ("MR", 25, [256, 256, 25])


def test_panel_connects_and_lists_mais(session):
    assert step(session, "connect_panel")["models"] == ["mais"]


def infer_params(record: dict) -> dict:
    """The `params` form field of the infer request a step sent."""
    return json.loads(record["infer"]["body"].split("\r\n\r\n", 1)[1].split("\r\n--", 1)[0])


def test_point_prompt_sends_the_series_voxel_that_was_clicked(session, series, sample_dicom, lesion_click_world):
    record = step(session, "point_prompt")
    assert record["infer"]["status"] == 200
    assert f"/infer/mais?image={series['brain1']}&output=image" in record["infer"]["url"]
    params = infer_params(record)
    assert params["background"] == [] and "label" not in params and len(params["lesion"]) == 1
    # OHIF's voxel order is the series' (ITK's) order: the voxel it sends is the one under the click
    reference = LoadImage(image_only=True, ensure_channel_first=True, reader="ITKReader")(str(sample_dicom / "brain1"))
    ras = LPS_FROM_RAS @ lesion_click_world
    expected = (np.linalg.inv(np.asarray(reference.affine)) @ np.array([*ras, 1]))[:3]
    assert np.abs(np.array(params["lesion"][0]) - expected).max() <= 1.0, (params["lesion"], expected)


def lesion_dice(session: dict, name: str, lesion_world: np.ndarray) -> float:
    """Dice of the lesion segment in OHIF's labelmap `name` with the ground truth, in world space."""
    shown = Labelmap(session["out"] / name)
    assert shown.other_voxels == 0  # nothing painted with another segment
    return dice(shown.mask, shown.truth(lesion_world))


def test_point_prompt_paints_the_lesion_into_ohifs_labelmap(session, lesion_world):
    """OHIF copies the returned buffer straight into its labelmap: in world space it must cover the lesion."""
    step(session, "point_prompt")
    score = lesion_dice(session, "labelmap_1.json", lesion_world)
    print(f"Dice of OHIF's lesion labelmap with the ground truth after one click: {score:.3f}")
    assert score > BRAIN1_LESION_MIN_DICE


def test_corrective_clicks_send_the_whole_history_and_are_obeyed(session, lesion_world):
    """A negative click on a false positive far from the lesion, then a positive one on a missed part, each with
    Run: every request carries all clicks so far, the overlay is background where the negative click fell, and
    it still covers the lesion. Not asserted, because the shipped weights do not do it yet (the generalist issue):
    that the Dice rises (the first click's mask keeps only the part the click lies in, so the farthest false
    positive left is a rim of the lesion's own part, and clicking it cuts lesion too: measured 0.748, 0.722,
    0.745), and that the positive click's voxel joins the overlay (measured: it stays outside)."""
    first = infer_params(step(session, "point_prompt"))["lesion"]
    scores = [lesion_dice(session, "labelmap_1.json", lesion_world)]
    for n, kind in enumerate(CORRECTIONS, start=2):
        record = step(session, f"correction_{n}")
        assert record["infer"]["status"] == 200
        params = infer_params(record)
        assert params["lesion"][0] == first[0]
        assert len(params["lesion"]) + len(params["background"]) == n
        assert len(params[kind]) == (1 if kind == "background" else 2)
        scores.append(lesion_dice(session, f"labelmap_{n}.json", lesion_world))
        shown = Labelmap(session["out"] / f"labelmap_{n}.json")
        clicked = json.loads((session["out"] / f"click_{n}.json").read_text())
        voxel = tuple(int(v) for v in shown.index(np.asarray(clicked["world"]))[0])
        if kind == "background":
            assert not shown.mask[voxel], voxel
    print("Dice of OHIF's labelmap after each click: " + ", ".join(f"{s:.3f}" for s in scores))
    assert min(scores) > BRAIN1_LESION_MIN_DICE, scores


def test_two_annotators_on_one_study_keep_their_own_masks(session):
    """Two browser contexts, neither sending a client id. The second annotator's one click on the lesion gets the
    mask one click gives, not the first annotator's refined one; and the first annotator's Run afterwards gives
    back their refined mask, untouched by the second's click."""
    second = step(session, "second_annotator")
    again = step(session, "first_annotator_again")
    assert "client_id" not in infer_params(second) and "client_id" not in infer_params(again)
    assert infer_params(second)["lesion"] == infer_params(step(session, "point_prompt"))["lesion"]
    assert infer_params(second)["background"] == []
    masks = {name: Labelmap(session["out"] / f"labelmap_{name}.json").mask for name in ("1", "3", "second_annotator")}
    masks["again"] = Labelmap(session["out"] / "labelmap_first_again.json").mask
    # the first annotator's session went on where it was: the same voxels as before the second annotator clicked
    np.testing.assert_array_equal(masks["again"], masks["3"])
    # the second got a one-click mask. Not asserted voxel-equal to the first annotator's: the same single click
    # has given two slightly different masks across runs (docs/OHIF.md)
    assert dice(masks["second_annotator"], masks["1"]) > 0.95
    assert dice(masks["second_annotator"], masks["3"]) < dice(masks["second_annotator"], masks["1"]) - 0.05


def seg_series(orthanc: str, study_uid: str) -> list[str]:
    """SeriesInstanceUIDs of the SEG series of a study, asked of Orthanc's QIDO-RS."""
    found = requests.get(f"{orthanc}/studies/{study_uid}/series", params={"Modality": "SEG"}, timeout=30)
    found.raise_for_status()
    return [s["0020000E"]["Value"][0] for s in (found.json() if found.content else [])]


def test_saving_stores_a_seg_in_orthanc_equal_to_the_overlay(session, orthanc, series):
    """The label saved with the panel's client is a DICOM SEG in Orthanc that decodes to OHIF's labelmap."""
    record = step(session, "save_label")
    assert record["request"]["status"] == 200 and record["request"]["method"] == "PUT"
    assert f"/datastore/label?image={series['brain1']}" in record["request"]["url"]
    study = step(session, "open_viewer")["studyInstanceUID"]
    [seg_uid] = seg_series(orthanc, study)
    [seg] = DICOMwebClient(orthanc).retrieve_series(study, seg_uid)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["brain1"]
    assert [(s.SegmentNumber, s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "lesion")]
    decoded = pydicom_seg.MultiClassReader().read(seg).image
    shown = Labelmap(session["out"] / "labelmap_first_again.json")  # what the overlay showed when it was saved
    assert decoded.GetSize() == shown.shape
    np.testing.assert_allclose(decoded.GetOrigin(), shown.origin, atol=1e-3)
    np.testing.assert_allclose(decoded.GetSpacing(), shown.spacing, atol=1e-6)
    np.testing.assert_allclose(np.reshape(decoded.GetDirection(), (3, 3)), shown.axes / shown.spacing, atol=1e-6)
    saved = sitk.GetArrayFromImage(decoded).transpose(2, 1, 0)  # [k, j, i] -> [i, j, k]
    assert set(np.unique(saved)) == {0, 1}
    np.testing.assert_array_equal(saved == 1, shown.mask)


def test_update_model_starts_a_run_the_panel_shows(session):
    """Update Model in Active Learning: POST /train/, the panel turns the button into Stop Training while the
    server reports the run; the panel's Stop Training ends it (DELETE /train/)."""
    record = step(session, "train")
    assert record["started"]["status"] == 200
    assert record["status"]["status"] == 200 and record["status"]["body"]["status"] == "RUNNING"
    assert record["stopped"]["status"] == 200
    assert (
        requests.get(f"{session['server']}/train/", params={"check_if_running": "true"}, timeout=30).status_code == 404
    )


def test_next_sample_opens_the_study_the_strategy_names(session, series):
    """Next Sample with mais_uncertain picked in the Strategy list: OK opens the study that mais_uncertain names.
    The bundled panel ignores the pick and always asks `random` (docs/OHIF.md); with brain1 labelled, lung1 is the
    only sample left, which both strategies name."""
    record = step(session, "next_sample")
    assert record["request"]["url"].endswith("/activelearning/random") and record["request"]["status"] == 200
    named = requests.post(f"{session['server']}/activelearning/{STRATEGY}", json={}, timeout=300)
    named.raise_for_status()
    named = named.json()
    # brain1 is labelled now, so the strategy names the other sample
    assert named["id"] == record["answer"]["id"] == series["lung1"]
    assert record["shown"]["studyInstanceUID"] == named["StudyInstanceUID"]
    assert record["shown"]["seriesInstanceUID"] == named["id"]
    assert f"StudyInstanceUIDs={named['StudyInstanceUID']}" in record["url"]


def test_the_overlay_is_drawn_where_the_user_clicked(session):
    """Pixels of the axial viewport before and after Run: the new colour sits around the click."""
    record = step(session, "point_prompt")
    before = np.asarray(Image.open(record["before"]).convert("RGB"), int)
    after = np.asarray(Image.open(record["after"]).convert("RGB"), int)
    changed = np.abs(after - before).max(axis=2) > 40
    rows, cols = np.nonzero(changed)
    assert len(rows) > 100, f"only {len(rows)} pixels changed"
    click = np.array(record["click"]) - [record["viewport"]["x"], record["viewport"]["y"]]
    # screenshots are in device pixels, the click in CSS pixels: the page runs at a device scale factor of 1
    assert np.hypot(cols.mean() - click[0], rows.mean() - click[1]) < 20
    assert after[changed][:, 1].mean() > after[changed][:, [0, 2]].mean() + 50  # the lesion segment's green


def test_the_browser_reports_no_errors(session):
    step(session, "next_sample")
    assert session["pageErrors"] == []
    expected = {line.format(server=session["server"]) for line in EXPECTED_HTTP_ERRORS}
    assert set(session["httpErrors"]) <= expected, session["httpErrors"]
    own = [r for r in session["failedRequests"] if r.startswith(session["server"])]
    assert own == [], own
    errors = [m for m in session["console"] if m.startswith("error:") and "Failed to load resource" not in m]
    assert errors == [], errors
