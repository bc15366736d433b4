"""The PACS path: a real Orthanc with its DICOMweb plugin holds the sample series, the app is started with
`--studies http://127.0.0.1:<port>/dicom-web`, clicks arrive as OHIF sends them, by SeriesInstanceUID, a final
label goes back to Orthanc as DICOM SEG, and training reads it from there.

Orthanc comes from Debian (`orthanc`, `orthanc-dicomweb`; `.ci/run` installs them), listens on 127.0.0.1 only
and stores into a temporary folder (the `orthanc` and `pacs_server` fixtures in conftest.py, shared with
test_ohif.py).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pydicom_seg
import pytest
import requests
import SimpleITK as sitk
from dicomweb_client import DICOMwebClient
from monai.transforms import LoadImage, Orientation
from monailabel.client import MONAILabelClient
from pydicom.uid import generate_uid

from clicking import BRAIN1_LESION_MIN_DICE, dice, interior_voxel
from server import SAMPLE_DATA, MonaiLabelServer

RAS = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))

pytestmark = [pytest.mark.pacs, pytest.mark.server]


def test_datastore_lists_the_series(pacs_server, series):
    stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert stats["total"] == len(series) and stats["completed"] == 0
    # `output=all` shows only MONAI Label's local cache of fetched series; the active-learning strategies walk the
    # PACS listing itself and hand out SeriesInstanceUIDs, which OHIF then opens
    chosen = requests.post(f"{pacs_server.url}/activelearning/random", json={}, timeout=60).json()
    assert chosen["id"] in series.values()


def test_next_sample_names_the_study_of_a_series_whose_cached_record_another_process_rewrote(pacs_server, series):
    """A training or scoring run is a process of its own with its own view of the series cache. One that finds a
    fetched series' NIfTI on disk before its record (LocalDatastore's reconcile) writes a bare record over the
    shared datastore file, a time stamp and a file name, and the server reloads that file. Next Sample must still
    name the study that OHIF opens the sample by: test_ohif.py's Next Sample answered without it one run in six,
    right after the panel had started and stopped a training run."""
    first = requests.post(f"{pacs_server.url}/activelearning/first", json={}, timeout=60).json()
    assert first["StudyInstanceUID"] and first["id"] in series.values()
    [datastore_file] = Path(pacs_server.env["MONAI_LABEL_DICOMWEB_CACHE_PATH"]).glob("*/datastore_v2.json")
    records = json.loads(datastore_file.read_text())
    info = records["objects"][first["id"]]["image"]["info"]
    records["objects"][first["id"]]["image"]["info"] = {"ts": info["ts"], "name": info["name"]}  # as reconcile does
    datastore_file.write_text(json.dumps(records, indent=2))
    for _ in range(50):  # the server's file watcher reloads the file within moments
        stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "all"}, timeout=60).json()
        if "StudyInstanceUID" not in stats["objects"][first["id"]]["image"]["info"]:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the server did not reload the rewritten datastore file")
    again = requests.post(f"{pacs_server.url}/activelearning/first", json={}, timeout=60).json()
    assert again["id"] == first["id"]
    assert again["StudyInstanceUID"] == first["StudyInstanceUID"]
    assert again["PatientID"] == first["PatientID"] and again["Modality"] == first["Modality"]


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
    assert dice(np.asarray(RAS(mask))[0] > 0, np.asarray(RAS(label))[0] == 1) > BRAIN1_LESION_MIN_DICE


def series_grid(series_dir: Path) -> sitk.Image:
    """A DICOM series as SimpleITK reads it (LPS geometry, voxels in the series' own order)."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(series_dir)))
    return reader.Execute()


def seg_series(orthanc: str, study_uid: str) -> list[str]:
    """SeriesInstanceUIDs of the SEG series of a study, asked of Orthanc's QIDO-RS."""
    found = requests.get(f"{orthanc}/studies/{study_uid}/series", params={"Modality": "SEG"}, timeout=30)
    found.raise_for_status()
    return [s["0020000E"]["Value"][0] for s in (found.json() if found.content else [])]


@pytest.fixture(scope="module")
def brain1_study(sample_dicom) -> str:
    return pydicom.dcmread(next((sample_dicom / "brain1").iterdir()), stop_before_pixels=True).StudyInstanceUID


@pytest.fixture(scope="module")
def brain1_truth(sample_dicom, tmp_path_factory) -> Path:
    """brain1's lesion label (sample-data) on the brain1 series' grid, as a viewer saves it: an NRRD of the
    series' size and geometry (the series runs its slices the other way than the sample NRRD)."""
    label = sitk.ReadImage(str(SAMPLE_DATA / "labels" / "final" / "brain1.nrrd"))
    on_series = sitk.Resample(label, series_grid(sample_dicom / "brain1"), sitk.Transform(), sitk.sitkNearestNeighbor)
    path = tmp_path_factory.mktemp("brain1-label") / "brain1_lesion.nrrd"
    sitk.WriteImage(sitk.Cast(on_series, sitk.sitkUInt8), str(path), True)
    return path


@pytest.fixture(scope="module")
def saved_seg(pacs_server, orthanc, series, brain1_study, brain1_truth, tmp_path_factory) -> pydicom.Dataset:
    """Save brain1's final label through the server with MONAI Label's client (the request of Slicer's Submit
    Label: PUT /datastore/label?image=<SeriesInstanceUID>&tag=final) and fetch the SEG it stored in Orthanc."""
    assert seg_series(orthanc, brain1_study) == []
    client = MONAILabelClient(pacs_server.url, tmpdir=str(tmp_path_factory.mktemp("client")))
    client.save_label(series["brain1"], str(brain1_truth), tag="final")
    [seg_uid] = seg_series(orthanc, brain1_study)
    [seg] = DICOMwebClient(orthanc).retrieve_series(brain1_study, seg_uid)
    return seg


def test_a_final_label_is_stored_in_the_pacs_as_dicom_seg_on_the_series_grid(
    saved_seg, series, sample_dicom, brain1_truth
):
    assert saved_seg.Modality == "SEG"
    assert saved_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series["brain1"]
    assert [(s.SegmentNumber, s.SegmentLabel) for s in saved_seg.SegmentSequence] == [(1, "lesion")]  # labels.py
    decoded = pydicom_seg.MultiClassReader().read(saved_seg).image
    reference = series_grid(sample_dicom / "brain1")
    assert decoded.GetSize() == reference.GetSize()
    np.testing.assert_allclose(decoded.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(decoded.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(decoded.GetDirection(), reference.GetDirection(), atol=1e-6)
    saved = sitk.GetArrayFromImage(sitk.ReadImage(str(brain1_truth)))
    assert saved.sum() > 1000
    np.testing.assert_array_equal(sitk.GetArrayFromImage(decoded), saved)


def test_ohif_raw_label_buffer_is_stored_as_a_seg_too(saved_seg, pacs_server, orthanc, series, brain1_truth):
    """OHIF uploads its labelmap as `label.bin`: one uint8 per voxel of the series, x fastest. Saving again keeps
    the earlier SEG (the PACS holds every version) and adds one."""
    study_uid = saved_seg.StudyInstanceUID
    before = set(seg_series(orthanc, study_uid))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(brain1_truth)))
    response = requests.put(
        f"{pacs_server.url}/datastore/label",
        params={"image": series["brain1"], "tag": "final"},
        files={"label": ("label.bin", truth.tobytes()), "params": (None, json.dumps({"label_info": [{"name": "x"}]}))},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    [new_uid] = set(seg_series(orthanc, study_uid)) - before
    [seg] = DICOMwebClient(orthanc).retrieve_series(study_uid, new_uid)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["lesion"]  # the app's name, not the client's
    np.testing.assert_array_equal(sitk.GetArrayFromImage(pydicom_seg.MultiClassReader().read(seg).image), truth)


def test_the_labelled_series_counts_as_labelled_and_its_seg_not_as_an_image(saved_seg, pacs_server, series):
    stats = requests.get(f"{pacs_server.url}/datastore/", params={"output": "stats"}, timeout=60).json()
    assert (stats["total"], stats["completed"]) == (len(series), 1)


@pytest.mark.parametrize(
    "name, detail",
    [
        ("wrong_size.nrrd", "not on the series' grid"),
        ("shifted.nrrd", "origin"),
        ("unknown_value.nrrd", "not in the app's label map"),
        ("empty.nrrd", "empty"),
        ("short.bin", "expected 1638400 bytes"),
    ],
)
def test_a_label_that_does_not_fit_the_series_gets_422_and_stores_nothing(
    pacs_server, orthanc, series, brain1_study, brain1_truth, tmp_path, name, detail
):
    truth = sitk.ReadImage(str(brain1_truth))
    path = tmp_path / name
    if name == "wrong_size.nrrd":
        sitk.WriteImage(truth[:, :, 1:], str(path))
    elif name == "shifted.nrrd":
        truth.SetOrigin([o + 2.0 for o in truth.GetOrigin()])
        sitk.WriteImage(truth, str(path))
    elif name == "unknown_value.nrrd":
        sitk.WriteImage(truth * 200, str(path))
    elif name == "empty.nrrd":
        sitk.WriteImage(truth * 0, str(path))
    else:  # OHIF's raw buffer, one slice short
        path.write_bytes(sitk.GetArrayFromImage(truth)[1:].tobytes())
    before = seg_series(orthanc, brain1_study)
    with open(path, "rb") as label:
        response = requests.put(
            f"{pacs_server.url}/datastore/label",
            params={"image": series["brain1"], "tag": "final"},
            files={"label": (name, label), "params": (None, "{}")},
            timeout=60,
        )
    assert response.status_code == 422, response.text
    assert detail in response.json()["detail"]
    assert seg_series(orthanc, brain1_study) == before


def click_request(url: str, image_id: str, voxel: list[int]) -> requests.Response:
    """One lesion click, as OHIF sends it (see test_ohif_click_by_series_uid_returns_a_mask_on_the_series_grid)."""
    params = {"lesion": [voxel], "background": [], "result_extension": ".nrrd", "result_dtype": "uint8"}
    return requests.post(
        f"{url}/infer/mais",
        params={"image": image_id, "output": "image"},
        files={"params": (None, json.dumps(params))},
        timeout=120,
    )


def test_requests_leave_no_files_in_the_temporary_folder(saved_seg, orthanc, series, sample_dicom, tmp_path):
    """Clicks on series the server has not converted yet and label downloads that decode a SEG: the stock
    DICOMweb datastore left the series' NIfTI and the decoded label in the temporary folder each time."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {
        "TMPDIR": str(temp),  # Python's tempfile and so MONAI Label write their temporary files here
        "MONAI_LABEL_DICOMWEB_SEARCH_FILTER": "{}",
        "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache"),
    }

    def files_in_temp() -> list[str]:
        return sorted(str(p.relative_to(temp)) for p in temp.rglob("*") if not p.is_dir())

    centres = {name: [n // 2 for n in series_grid(sample_dicom / name).GetSize()] for name in ("brain1", "lung1")}
    with MonaiLabelServer(orthanc, tmp_path / "server.log", env=env) as server:
        at_start = files_in_temp()
        for i in range(20):
            name = ("brain1", "lung1")[i % 2]
            if i % 4 == 3:  # a label download: GET /datastore/label?label=<SeriesInstanceUID>&tag=final
                response = requests.get(
                    f"{server.url}/datastore/label", params={"label": series["brain1"], "tag": "final"}, timeout=60
                )
            else:
                response = click_request(server.url, series[name], centres[name])
            assert response.status_code == 200, response.text + server.log()[-3000:]
        assert files_in_temp() == at_start


def test_the_newest_seg_of_a_series_is_what_a_fresh_server_serves_and_trains_on(
    saved_seg, pacs_server, orthanc, series, brain1_study, brain1_truth, tmp_path
):
    """Saving a corrected label adds a SEG and leaves the earlier ones in the PACS; a server with an empty cache
    (not the one that saved: it has to download and decode the SEGs, as for a SEG from any other source) serves
    and trains on the newest. The correction adds a grey-matter block to the lesion, so training, with one crop
    per structure, makes two crops from it and one from the earlier labels."""
    truth = sitk.ReadImage(str(brain1_truth))
    corrected = sitk.GetArrayFromImage(truth)
    block = (slice(3, 7), slice(100, 140), slice(60, 100))  # (z, y, x), clear of the lesion
    assert not corrected[block].any()
    corrected[block] = 2  # grey_matter in labels.py
    corrected_label = sitk.GetImageFromArray(corrected)
    corrected_label.CopyInformation(truth)
    corrected_file = tmp_path / "brain1_corrected.nrrd"
    sitk.WriteImage(corrected_label, str(corrected_file), True)

    earlier = set(seg_series(orthanc, brain1_study))
    client = MONAILabelClient(pacs_server.url, tmpdir=str(tmp_path))
    client.save_label(series["brain1"], str(corrected_file), tag="final")
    [newest_uid] = set(seg_series(orthanc, brain1_study)) - earlier
    assert saved_seg.SeriesInstanceUID in earlier  # nothing is deleted from the PACS
    [newest] = DICOMwebClient(orthanc).retrieve_series(brain1_study, newest_uid)
    # the SEG's creation time is what orders saves: to the microsecond, so two saves in one second still order
    assert "." in newest.ContentTime and len(newest.ContentTime.split(".")[1]) == 6
    assert (newest.ContentDate, newest.ContentTime) > (saved_seg.ContentDate, saved_seg.ContentTime)
    # A SEG of the first label made the day before and sent to the PACS only now (a workstation that was
    # offline): the newest is decided by creation, not by arrival or by where the PACS lists it.
    [late] = DICOMwebClient(orthanc).retrieve_series(brain1_study, saved_seg.SeriesInstanceUID)
    late.SeriesInstanceUID, late.SOPInstanceUID = generate_uid(), generate_uid()
    late.file_meta.MediaStorageSOPInstanceUID = late.SOPInstanceUID
    late.ContentDate = (datetime.strptime(saved_seg.ContentDate, "%Y%m%d") - timedelta(days=1)).strftime("%Y%m%d")
    DICOMwebClient(orthanc).store_instances([late])
    assert set(seg_series(orthanc, brain1_study)) == earlier | {newest_uid, late.SeriesInstanceUID}

    env = {"MONAI_LABEL_DICOMWEB_SEARCH_FILTER": "{}", "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "cache")}
    options = {"max_epochs": 1, "val_split": 0, "crops_per_structure": 1, "train_batch_size": 1, "clicks": 2}
    with MonaiLabelServer(orthanc, tmp_path / "server.log", env=env) as fresh:
        # Slicer's and OHIF's label download: the label of the image series, by its SeriesInstanceUID
        response = requests.get(
            f"{fresh.url}/datastore/label", params={"label": series["brain1"], "tag": "final"}, timeout=120
        )
        assert response.status_code == 200, response.text + fresh.log()[-3000:]
        downloaded = tmp_path / "downloaded.nii.gz"
        downloaded.write_bytes(response.content)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(downloaded))), corrected)
        cache = requests.get(f"{fresh.url}/datastore/", params={"output": "all"}, timeout=60).json()
        assert cache["objects"][series["brain1"]]["labels"]["final"]["info"]["SeriesInstanceUID"] == newest_uid

        response = requests.post(f"{fresh.url}/train/mais", params={"run_sync": "true"}, json=options, timeout=600)
        assert response.status_code == 200, response.text + fresh.log()[-3000:]
        stats = requests.get(f"{fresh.url}/info/", timeout=60).json()["train_stats"]["mais"]
    assert stats["status"] == "done"
    assert stats["train_images"] == [series["brain1"]]
    assert stats["train_crops"] == 2  # the lesion and the block: the corrected label, not the earlier one
