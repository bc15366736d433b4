"""Shared fixtures: one real MONAI Label server for the whole test session, the sample DICOM series, and a real
Orthanc PACS with an app started on it (one of each per test module that asks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from monailabel.client import MONAILabelClient

from server import APP_DIR, REPO_ROOT, MonaiLabelServer, copy_sample_data, free_port

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"

# Tests use the app's own code (labels, model core) and scripts to check what the server answers.
sys.path[:0] = [str(APP_DIR), str(REPO_ROOT / "scripts")]


@pytest.fixture(scope="session")
def studies(tmp_path_factory):
    """A private copy of sample-data/ that the server may write to."""
    return copy_sample_data(tmp_path_factory.mktemp("studies") / "sample-data")


@pytest.fixture(scope="session")
def server(studies, tmp_path_factory):
    running = MonaiLabelServer(studies, tmp_path_factory.mktemp("logs") / "server.log")
    with running:
        yield running
        print(running.log()[-3000:])


@pytest.fixture()
def client(server, tmp_path):
    # Results land in tmp_path: each test's files stay its own (the system's folder works as well: test_infer.py)
    return MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="pytest")


@pytest.fixture(scope="session")
def sample_dicom(tmp_path_factory):
    """brain1 and lung1 as DICOM series (scripts/build_sample_dicom.py): one sub-folder per image."""
    import build_sample_dicom

    out = tmp_path_factory.mktemp("dicom")
    build_sample_dicom.main(["--out", str(out), "--images", "brain1,lung1"])
    return out


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
        wait_until_ready(url, process, root / "orthanc.log")
        for path in sorted(sample_dicom.rglob("*.dcm")):
            requests.post(f"{url}/instances", data=path.read_bytes(), timeout=30).raise_for_status()
        yield f"{url}/dicom-web"
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    """Until Orthanc answers; fails the test with Orthanc's log if it exits or never answers."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Orthanc exited with {process.returncode}:\n{log.read_text(errors='replace')[-5000:]}")
        try:
            if requests.get(f"{url}/system", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    pytest.fail(f"Orthanc not ready after {timeout_s} s:\n{log.read_text(errors='replace')[-5000:]}")


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
