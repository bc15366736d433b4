"""The PACS path: a real Orthanc with its DICOMweb plugin holds the sample series, the app is started with
`--studies http://127.0.0.1:<port>/dicom-web`, and clicks arrive as OHIF sends them, by SeriesInstanceUID.

Orthanc comes from Debian (`orthanc`, `orthanc-dicomweb`; `.ci/run` installs them), listens on 127.0.0.1 only
and stores into a temporary folder.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from monai.transforms import LoadImage, Orientation

from clicking import dice, interior_voxel
from server import SAMPLE_DATA, MonaiLabelServer, free_port

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
RAS = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


@pytest.fixture(scope="module")
def series(sample_dicom) -> dict[str, str]:
    """{image name: SeriesInstanceUID}."""
    return {
        d.name: pydicom.dcmread(next(d.iterdir()), stop_before_pixels=True).SeriesInstanceUID
        for d in sample_dicom.iterdir()
    }


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, sample_dicom):
    """A running Orthanc with the sample series uploaded; yields its DICOMweb root URL."""
    orthanc_binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    assert Path(orthanc_binary).exists(), "Orthanc is not installed: apt-get install orthanc orthanc-dicomweb"
    root = tmp_path_factory.mktemp("orthanc")
    port = free_port()
    config = {
        "Name": "mais-tests",
        "StorageDirectory": str(root / "db"),
        "IndexDirectory": str(root / "db"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    with open(root / "orthanc.log", "wb") as log:
        process = subprocess.Popen([orthanc_binary, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(60):
            try:
                if requests.get(f"{url}/system", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        for path in sorted(sample_dicom.rglob("*.dcm")):
            requests.post(f"{url}/instances", data=path.read_bytes(), timeout=30).raise_for_status()
        yield f"{url}/dicom-web"
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def pacs_server(orthanc, tmp_path_factory):
    root = tmp_path_factory.mktemp("pacs-server")
    env = {
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": "{}",  # MONAI Label lists only CT series unless told otherwise
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(root / "cache"),
    }
    with MonaiLabelServer(orthanc, root / "server.log", env=env) as server:
        yield server
        print(server.log()[-3000:])


def test_datastore_lists_the_series(pacs_server, series):
    stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert stats["total"] == len(series) and stats["completed"] == 0
    # `output=all` shows only MONAI Label's local cache of fetched series; the active-learning strategies walk the
    # PACS listing itself and hand out SeriesInstanceUIDs, which OHIF then opens
    chosen = requests.post(f"{pacs_server.url}/activelearning/random", json={}, timeout=60).json()
    assert chosen["id"] in series.values()


def test_ohif_click_by_series_uid_returns_a_mask_on_the_series_grid(pacs_server, series, sample_dicom, tmp_path):
    """OHIF's exact request: label-keyed lists, no `label`, no client_id, voxel indices of the series volume."""
    label = LoadImage(image_only=True, ensure_channel_first=True)(str(SAMPLE_DATA / "labels" / "final" / "brain1.nrrd"))
    # the lesion's deepest voxel, in the series' own voxel order (its slices run the other way than the NRRD's)
    reference = LoadImage(image_only=True, ensure_channel_first=True, reader="ITKReader")(str(sample_dicom / "brain1"))
    world = np.asarray(label.affine) @ np.array(
        [*interior_voxel(SAMPLE_DATA / "labels" / "final" / "brain1.nrrd", 1), 1]
    )
    click = np.rint(np.linalg.inv(np.asarray(reference.affine)) @ world)[:3].astype(int).tolist()
    params = {
        "background": [],
        "lesion": [click],
        "result_extension": ".nrrd",
        "result_dtype": "uint8",
        "result_compress": False,
        "restore_label_idx": False,
    }
    response = requests.post(
        f"{pacs_server.url}/infer/mais",
        params={"image": series["brain1"], "output": "image"},
        files={"params": (None, json.dumps(params))},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    result_file = tmp_path / "result.nrrd"
    result_file.write_bytes(response.content)
    mask = LoadImage(image_only=True, ensure_channel_first=True)(str(result_file))
    assert mask.shape == reference.shape  # OHIF copies the buffer straight into its labelmap
    np.testing.assert_allclose(np.asarray(mask.affine), np.asarray(reference.affine), atol=1e-3)
    assert dice(np.asarray(RAS(mask))[0] > 0, np.asarray(RAS(label))[0] == 1) > 0.8
