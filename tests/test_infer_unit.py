"""The infer task, the model loader and active-learning scoring on a tiny model, called as MONAI Label calls
them, without a server."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np
import pytest
from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

import lib.infers.mais
from lib.activelearning.disagreement import ProbeConfig
from lib.activelearning.tasks import WEIGHTS_KEY, DisagreementScoring
from lib.configs.app_settings import AppSettings
from lib.configs.labels import SAMPLE_LABELS
from lib.imaging import ModelSpaceImage
from lib.infers.mais import MaisInfer
from lib.model.config import MEMORY_MODES
from lib.model.weights import save_mais
from lib.model_loader import ModelLoader
from lib.session.interactive import InteractiveSession
from lib.trainers.mais import MaisTrainer
from tiny import INSIDE, box_truth, tiny_model, write_box_image

INSIDE = list(INSIDE)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    return write_box_image(tmp_path_factory.mktemp("images") / "box.nii.gz")


@pytest.fixture()
def settings(tmp_path):
    save_mais(tiny_model(), tmp_path / "tiny.pt")
    return AppSettings(weights=tmp_path / "tiny.pt", train_dir=tmp_path / "train")


@pytest.fixture(autouse=True)
def results_in_tmp_path(tmp_path, monkeypatch):
    """The task's results wait for the endpoint to send and delete them; no endpoint here: they go to tmp_path."""
    monkeypatch.setattr(lib.infers.mais, "RESULTS_DIR", tmp_path / "results")


@pytest.fixture()
def infer(settings):
    return MaisInfer(settings, dict(SAMPLE_LABELS), ModelLoader(settings))


def slicer(image_file, label: str, points: list, **extra) -> dict:
    return {"image": str(image_file), "label": label, label: points, "background": [], **extra}


def test_the_result_reports_seconds_per_stage_as_monai_label_does(infer, image_file):
    label_path, result = infer(slicer(image_file, "lesion", [INSIDE]))
    latencies = result["latencies"]
    assert set(latencies) == {"pre", "infer", "invert", "write", "total"}
    assert all(v > 0 for v in latencies.values()), latencies
    assert latencies["pre"] + latencies["infer"] + latencies["invert"] + latencies["write"] <= latencies["total"] + 1e-3
    assert result["steps_run"] == 1 and result["changed_box"] is not None and label_path


def test_a_click_outside_the_image_creates_no_session(infer, image_file):
    with pytest.raises(HTTPException) as error:
        infer(slicer(image_file, "lesion", [INSIDE, [30, 0, 0]]))
    assert error.value.status_code == 422 and "outside the image of shape (30, 30, 30)" in error.value.detail
    assert len(infer.sessions) == 0


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["NaN", "Inf"])
@pytest.mark.parametrize("everywhere", [False, True], ids=["one voxel", "every voxel"])
def test_an_image_with_voxels_that_are_not_finite_is_refused(infer, tmp_path, bad, everywhere):
    """A NaN or an infinity would spread through the normalisation into every voxel's intensity: 422 naming the
    problem, instead of a silently wrong mask."""
    volume = nib.load(write_box_image(tmp_path / "box.nii.gz")).get_fdata().astype(np.float32)
    if everywhere:
        volume[:] = bad
    else:
        volume[3, 4, 5] = bad
    path = tmp_path / "not_finite.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.diag([4.0, 4.0, 4.0, 1.0])), path)
    with pytest.raises(HTTPException) as error:
        infer(slicer(path, "lesion", [INSIDE]))
    count = volume.size if everywhere else 1
    assert error.value.status_code == 422
    assert f"{count} of {volume.size} voxels that are NaN or infinite" in error.value.detail
    assert len(infer.sessions) == 0


@pytest.mark.parametrize("shape", [(64, 64), (32, 32, 16, 3)], ids=["2D", "4D"])
def test_an_image_that_is_not_3d_is_refused(infer, tmp_path, shape):
    """An upload is checked before it is stored (test_upload.py); a file copied into the studies folder is not."""
    path = tmp_path / "not_3d.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(size=shape).astype(np.float32), np.eye(4)), path)
    with pytest.raises(HTTPException) as error:
        infer(slicer(path, "lesion", [[1, 1, 1]]))
    assert error.value.status_code == 422 and f"({len(shape)}D)" in error.value.detail
    assert len(infer.sessions) == 0


@pytest.mark.parametrize("damage", ["deleted", "corrupt"])
def test_unusable_published_weights_answer_503_naming_the_file(infer, settings, image_file, damage):
    settings.train_dir.mkdir()
    published = settings.trained_weights
    shutil.copy(settings.weights, published)
    infer(slicer(image_file, "lesion", [INSIDE]))
    if damage == "deleted":  # the served file is gone: its own error names it, as settings now serve `weights`
        settings.weights.unlink()
        published.unlink()
        missing = settings.weights
    else:
        published.write_bytes(b"not a weights file")
        missing = published
    for _ in range(2):  # every click gets the answer, the task stays usable once the file is fixed
        with pytest.raises(HTTPException) as error:
            infer(slicer(image_file, "lesion", [INSIDE]))
        assert error.value.status_code == 503 and str(missing) in error.value.detail
    save_mais(tiny_model(), missing)
    assert infer(slicer(image_file, "lesion", [INSIDE]))[1]["steps_run"] == 1


def test_ohif_on_a_put_session_volume_continues_the_label_that_got_the_click(infer, image_file):
    """OHIF's label-less request is for the label whose list no stored session has applied."""
    session = {"name": "volume-session-1"}
    first, second, other = INSIDE, [11, 13, 9], [20, 20, 20]
    infer({**slicer(image_file, "lesion", [first]), "session": session})
    infer({**slicer(image_file, "white_matter", [other]), "session": session})
    ohif = {"image": str(image_file), "lesion": [first, second], "white_matter": [other], "background": []}
    _, result = infer({**ohif, "session": session})
    assert result["label"] == "lesion" and result["steps_run"] == 1 and result["clicks"] == 2


def ohif(image_file, points: list) -> dict:
    """OHIF's request: label-keyed lists, no `label`, no client_id."""
    return {"image": str(image_file), "lesion": points, "background": [], "result_extension": ".nii.gz"}


def test_two_ohif_users_without_client_ids_on_one_image_get_their_own_masks(infer, settings, image_file):
    """Both are `anonymous`: each request continues the session its history extends, so neither user's
    clicks reach the other's memory and neither thrashes the other's session with replays."""
    a = [INSIDE, [11, 13, 9], [18, 20, 16]]
    b = [[12, 19, 10], [16, 14, 12], [13, 20, 15]]
    masks, steps = {"a": [], "b": []}, []
    for k in range(1, 4):
        for user, points in (("a", a), ("b", b)):
            label_path, result = infer(ohif(image_file, points[:k]))
            masks[user].append(np.asarray(nib.load(label_path).dataobj))
            steps.append(result["steps_run"])
    assert steps == [1] * 6, "a user's click replayed a session"
    for user, points in (("a", a), ("b", b)):
        lone = MaisInfer(settings, dict(SAMPLE_LABELS), ModelLoader(settings))
        for k in range(1, 4):
            np.testing.assert_array_equal(
                masks[user][k - 1], np.asarray(nib.load(lone(ohif(image_file, points[:k]))[0]).dataobj)
            )
    assert not np.array_equal(masks["a"][-1], masks["b"][-1])


class PublishingDatastore(LocalDatastore):
    """MONAI Label's local datastore, publishing new weights while a score is being computed (as a training run
    finishing at that moment would)."""

    publish = None

    def get_image_uri(self, image_id: str) -> str:
        if self.publish:
            self.publish()
            self.publish = None
        return super().get_image_uri(image_id)


def test_a_score_is_filed_under_the_weights_that_computed_it(settings, image_file, tmp_path):
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(image_file, studies / "box.nii.gz")
    datastore = PublishingDatastore(str(studies))
    loader = ModelLoader(settings)
    scoring = DisagreementScoring(loader, ProbeConfig(probes=1))
    scored_by = loader.get().version
    datastore.publish = lambda: save_mais(tiny_model(), settings.trained_weights)
    scoring.score(datastore, "box")
    assert datastore.get_image_info("box")[WEIGHTS_KEY] == scored_by
    # the weights served now did not make it: it is stale, and the next scoring run recomputes it
    assert loader.get().version != scored_by and scoring.current_score(datastore, "box") is None


def test_the_loader_reloads_only_when_the_file_changes(settings):
    loader = ModelLoader(settings)
    served = loader.get()
    assert loader.get() is served
    save_mais(tiny_model(), settings.trained_weights)
    republished = loader.get()
    assert republished.model is not served.model and republished.version.startswith("mais_trained.pt@")


def test_the_trainer_still_describes_itself_while_the_served_weights_are_unusable(
    infer, settings, image_file, tmp_path
):
    """/info (the trainer's config) is what Slicer and OHIF ask first: it answers while clicks get 503, and a
    training run is refused with 503 naming the file instead of failing in the background."""
    trainer = MaisTrainer(settings, dict(SAMPLE_LABELS), infer.model_loader)
    healthy = trainer.config()
    settings.weights.write_bytes(b"not a weights file")
    assert trainer.config()["memory_mode"][0] in MEMORY_MODES
    assert set(trainer.config()) == set(healthy)
    studies = tmp_path / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    shutil.copy(image_file, studies / "box.nii.gz")
    nib.save(
        nib.Nifti1Image(box_truth().astype(np.uint8), np.diag([4.0, 4.0, 4.0, 1.0])),
        studies / "labels" / "final" / "box.nii.gz",
    )
    with pytest.raises(HTTPException) as error:
        trainer({"max_epochs": 1, "multi_gpu": False}, LocalDatastore(str(studies)))
    assert error.value.status_code == 503 and str(settings.weights) in error.value.detail


def test_a_click_on_an_existing_session_does_not_prepare_its_image_again(infer, image_file):
    """The prepared-image cache holds a few images only: a session's next click must not reload its image (with
    many images in use that would mean reading and resampling the file on every click)."""
    infer(slicer(image_file, "lesion", [INSIDE]))

    def prepare_again(*_):
        raise AssertionError("the image was prepared again")

    infer._prepared_image = prepare_again
    assert infer(slicer(image_file, "lesion", [INSIDE, [11, 13, 9]]))[1]["steps_run"] == 1


def test_fifty_sessions_stay_within_max_session_mb_and_an_evicted_one_recovers(tmp_path, image_file):
    """50 annotators with histories of their own, four requests at a time: the store keeps what fits in
    max_session_mb (every byte a session holds, its window included) and evicts the least recently used; an
    evicted annotator's next click replays its history and gets the mask a lone annotator gets, no error."""
    save_mais(tiny_model(), tmp_path / "tiny.pt")
    settings = AppSettings(weights=tmp_path / "tiny.pt", train_dir=tmp_path / "train", max_session_mb=128)
    infer = MaisInfer(settings, dict(SAMPLE_LABELS), ModelLoader(settings))
    firsts = [[i, j, k] for i in (5, 9, 13, 17, 21) for j in (5, 9, 13, 17, 21) for k in (10, 20)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(r["steps_run"] == 1 for _, r in pool.map(lambda p: infer(slicer(image_file, "lesion", [p])), firsts))
    bound = settings.max_session_mb * 2**20
    assert 0 < infer.sessions.nbytes <= bound and 1 < len(infer.sessions) < len(firsts)

    model = infer.model_loader.get().model
    image = ModelSpaceImage.from_file(str(image_file))
    steps = []
    for first in firsts[-2:] + firsts[:2]:  # the newest are stored (about 11 fit), the oldest were evicted
        history = [first, INSIDE]
        label_path, result = infer(slicer(image_file, "lesion", history))
        steps.append(result["steps_run"])
        lone = InteractiveSession(image, model)
        lone.apply([tuple(first)], [])
        lone.apply([tuple(p) for p in history], [])
        np.testing.assert_array_equal(np.asarray(nib.load(label_path).dataobj) > 0, lone.mask)
    assert steps == [1, 1, 2, 2], "stored sessions run the new click, evicted ones replay both"
    assert infer.sessions.nbytes <= bound
