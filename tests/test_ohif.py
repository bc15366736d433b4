"""The OHIF viewer that ships inside MONAI Label (`/ohif/`), driven in headless Chromium against the PACS setup of
test_dicomweb.py (conftest.py's `orthanc` and `pacs_server`, a copy of its own): study list, MONAI Label mode, the
MONAI Label panel, one point prompt and the overlay it paints.

Needs Debian's `chromium` and `playwright-core` from tests/ohif/package-lock.json (`npm ci` there); `.ci/run`
installs both. No browser is downloaded: Playwright drives /usr/bin/chromium. Screenshots and the browser's own
record (result.json: steps, console errors, failed requests) land in the test's tmp folder, printed at the start.
What the bundled OHIF does and does not do with this app: docs/OHIF.md.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from monai.transforms import LoadImage
from PIL import Image

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

pytestmark = [pytest.mark.browser, pytest.mark.pacs, pytest.mark.server]


@pytest.fixture(scope="module")
def lesion_click_world() -> np.ndarray:
    """The lesion's deepest voxel of brain1 in patient LPS mm, the coordinates cornerstone3D works in."""
    label = LoadImage(image_only=True, ensure_channel_first=True)(str(LESION_LABEL))
    ras = np.asarray(label.affine) @ np.array([*interior_voxel(LESION_LABEL, 1), 1])
    return LPS_FROM_RAS @ ras[:3]


@pytest.fixture(scope="module")
def session(pacs_server, lesion_click_world, tmp_path_factory) -> dict:
    """Runs tests/ohif/ohif_session.js once; returns its result.json plus `out` (the artifact folder)."""
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
        "out": str(out),
        "chromium": chromium,
    }
    (out / "config.json").write_text(json.dumps(config))
    run = subprocess.run(
        [node, str(OHIF_DIR / "ohif_session.js"), str(out / "config.json")],
        cwd=OHIF_DIR,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0 and (out / "result.json").exists(), f"the browser session crashed:\n{run.stderr}"
    result = json.loads((out / "result.json").read_text())
    for name, step in result["steps"].items():
        print(f"{name}: {'ok' if step['ok'] else 'FAILED'} in {step['seconds']:.1f} s")
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


def test_point_prompt_sends_the_series_voxel_that_was_clicked(session, series, sample_dicom, lesion_click_world):
    step(session, "point_prompt")
    infer = session["infer"]
    assert infer["status"] == 200
    assert f"/infer/mais?image={series['brain1']}&output=image" in infer["url"]
    params = json.loads(infer["params"].split("\r\n\r\n", 1)[1].split("\r\n--", 1)[0])
    assert params["background"] == [] and "label" not in params and len(params["lesion"]) == 1
    # OHIF's voxel order is the series' (ITK's) order: the voxel it sends is the one under the click
    reference = LoadImage(image_only=True, ensure_channel_first=True, reader="ITKReader")(str(sample_dicom / "brain1"))
    ras = LPS_FROM_RAS @ lesion_click_world
    expected = (np.linalg.inv(np.asarray(reference.affine)) @ np.array([*ras, 1]))[:3]
    assert np.abs(np.array(params["lesion"][0]) - expected).max() <= 1.0, (params["lesion"], expected)


def test_point_prompt_paints_the_lesion_into_ohifs_labelmap(session):
    """OHIF copies the returned buffer straight into its labelmap: in world space it must cover the lesion."""
    step(session, "point_prompt")
    shown = json.loads((session["out"] / "labelmap.json").read_text())
    nx, ny, nz = shown["dimensions"]
    painted = np.zeros(nx * ny * nz, bool)
    painted[shown["voxels"]] = True
    # the lesion of the ground truth, moved onto OHIF's grid through world coordinates
    label = LoadImage(image_only=True, ensure_channel_first=True)(str(LESION_LABEL))
    lesion_voxels = np.argwhere(np.asarray(label)[0] == 1)
    world = (LPS_FROM_RAS @ (np.asarray(label.affine) @ np.c_[lesion_voxels, np.ones(len(lesion_voxels))].T)[:3]).T
    axes = np.asarray(shown["direction"], float).reshape(3, 3).T * np.asarray(shown["spacing"], float)
    ijk = np.rint(np.linalg.solve(axes, (world - np.asarray(shown["origin"])).T).T).astype(int)
    assert (ijk >= 0).all() and (ijk < [nx, ny, nz]).all(), "the lesion lies outside OHIF's volume"
    truth = np.zeros_like(painted)
    truth[ijk[:, 0] + ijk[:, 1] * nx + ijk[:, 2] * nx * ny] = True
    assert shown["otherVoxels"] == 0
    score = dice(painted, truth)
    print(f"Dice of OHIF's lesion labelmap with the ground truth after one click: {score:.3f}")
    assert score > BRAIN1_LESION_MIN_DICE


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
    step(session, "point_prompt")
    assert session["pageErrors"] == []
    expected = {line.format(server=session["server"]) for line in EXPECTED_HTTP_ERRORS}
    assert set(session["httpErrors"]) <= expected, session["httpErrors"]
    own = [r for r in session["failedRequests"] if r.startswith(session["server"])]
    assert own == [], own
    errors = [m for m in session["console"] if m.startswith("error:") and "Failed to load resource" not in m]
    assert errors == [], errors
