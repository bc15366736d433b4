"""`PUT /datastore/image` on a real server: an image MAIS could not segment is refused before it is stored."""

from __future__ import annotations

import glob
import os
import tempfile
import time
import uuid
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests

pytestmark = pytest.mark.server

SHAPE = (16, 16, 16)


def write_volume(path: Path, data: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4)), path)


def volume(*, bad: float | None = None, everywhere: bool = False, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    data = np.random.default_rng(0).normal(size=shape)
    if everywhere:
        data[:] = bad
    elif bad is not None:
        data[3, 4, 5] = bad
    return data


VOXELS = int(np.prod(SHAPE))
BAD_UPLOADS = {
    "corrupt file": (None, "cannot read image"),
    "NaN voxel": (volume(bad=np.nan), f"1 of {VOXELS} voxels that are NaN or infinite"),
    "Inf voxel": (volume(bad=np.inf), f"1 of {VOXELS} voxels that are NaN or infinite"),
    "no finite voxel": (volume(bad=-np.inf, everywhere=True), f"{VOXELS} of {VOXELS} voxels that are NaN"),
    "2D": (volume(shape=(32, 32)), "(2D)"),
    "one slice": (volume(shape=(32, 32, 1)), "MAIS segments 3D volumes"),
    "4D": (volume(shape=(*SHAPE, 3)), "(4D)"),
}


def put_image(url: str, path: Path, image_id: str) -> requests.Response:
    with open(path, "rb") as file:
        return requests.put(
            f"{url}/datastore/image", params={"image": image_id}, files={"file": (path.name, file)}, timeout=60
        )


def datastore_listing(url: str) -> dict:
    response = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30)
    response.raise_for_status()
    return response.json()


def studies_files(studies: Path) -> set[Path]:
    return {path for path in studies.rglob("*") if path.is_file() and path.name != ".lock"}


def marked_upload_name(tmp_path: Path) -> tuple[Path, str]:
    """A file name whose marker the endpoint's temporary copy keeps (it takes the upload's suffixes), so that a copy
    left in the server's temporary folder can be found; returns (path, the copies' glob pattern)."""
    marker = f"mais{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"upload.{marker}.nii.gz"
    return path, os.path.join(tempfile.gettempdir(), f"*.{marker}.nii.gz")


@pytest.mark.parametrize("case", list(BAD_UPLOADS))
def test_an_image_mais_cannot_segment_gets_422_and_is_not_stored(server, tmp_path, case):
    data, expected = BAD_UPLOADS[case]
    path, server_copies = marked_upload_name(tmp_path)
    if data is None:
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        write_volume(path, data)
    listing, files = datastore_listing(server.url), studies_files(server.studies)

    response = put_image(server.url, path, "refused")

    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"] and "'refused' not added" in response.json()["detail"]
    assert datastore_listing(server.url) == listing
    assert studies_files(server.studies) == files
    assert not glob.glob(server_copies), "the server kept its temporary copy of the refused upload"


def test_a_valid_upload_is_stored_and_listed(server, tmp_path):
    path, server_copies = marked_upload_name(tmp_path)
    write_volume(path, volume())
    response = put_image(server.url, path, "valid_upload")
    try:
        assert response.status_code == 200, response.text
        assert "valid_upload" in datastore_listing(server.url)["objects"]
        assert (server.studies / "valid_upload.nii.gz").is_file()
    finally:
        requests.delete(f"{server.url}/datastore/image", params={"id": "valid_upload"}, timeout=30)
    deadline = time.monotonic() + 10  # the endpoint deletes its copy in a background task after answering
    while glob.glob(server_copies) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not glob.glob(server_copies)
