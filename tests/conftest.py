"""Shared fixtures: one real MONAI Label server for the whole test session."""

from __future__ import annotations

import sys

import pytest
from monailabel.client import MONAILabelClient

from server import APP_DIR, REPO_ROOT, MonaiLabelServer, copy_sample_data

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
    # Results land in tmp_path, not /tmp: there the server's clean-up of a file of the same name would race.
    return MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id="pytest")


@pytest.fixture(scope="session")
def sample_dicom(tmp_path_factory):
    """brain1 and lung1 as DICOM series (scripts/build_sample_dicom.py): one sub-folder per image."""
    import build_sample_dicom

    out = tmp_path_factory.mktemp("dicom")
    build_sample_dicom.main(["--out", str(out), "--images", "brain1,lung1"])
    return out
