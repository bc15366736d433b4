"""The app starts offline on the sample data and says clearly why when it cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from lib.configs.labels import SAMPLE_LABELS
from server import SAMPLE_DATA, MonaiLabelServer, run_until_exit

LABELLED_IMAGES = {"colin27_t1", "icbm2009a_t1", "brain1", "lung1"}
UNLABELLED_IMAGES = {"colin27_t1_brain", "breast1"}

pytestmark = pytest.mark.server  # every test starts a server, or a start that must fail


def test_info_lists_mais_with_the_sample_labels(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    mais = info["models"]["mais"]
    assert mais["type"] == "deepedit"
    assert mais["dimension"] == 3
    assert mais["labels"] == SAMPLE_LABELS
    assert info["labels"] == sorted(SAMPLE_LABELS, key=SAMPLE_LABELS.get)  # a list: OHIF appends to it
    assert {"memory_mode", "memory_size", "session_ttl_s"} <= set(mais["config"])
    assert {"random", "first"} <= set(info["strategies"])


def test_datastore_counts_images_and_labels(server):
    stats = requests.get(f"{server.url}/datastore/", params={"output": "stats"}, timeout=30).json()
    assert stats["total"] == len(LABELLED_IMAGES | UNLABELLED_IMAGES)
    assert stats["completed"] == len(LABELLED_IMAGES)


def test_client_sees_the_same_datastore(client):
    assert "mais" in client.info()["models"]
    datastore = client.datastore()
    objects = datastore["objects"]
    assert set(objects) == LABELLED_IMAGES | UNLABELLED_IMAGES
    labelled = {image for image, entry in objects.items() if entry["labels"].get("final")}
    assert labelled == LABELLED_IMAGES


def test_active_learning_offers_an_unlabelled_image(client):
    sample = client.next_sample("random", {})
    assert sample["id"] in UNLABELLED_IMAGES


def _assert_refused(conf: dict[str, str], *expected: str, studies: Path | str = SAMPLE_DATA) -> None:
    code, output = run_until_exit(studies, conf)
    assert code != 0, output
    assert "MAIS cannot start" in output
    for text in expected:
        assert text in output, output
    assert "Traceback" not in output, output


def test_unknown_conf_option_is_refused():
    _assert_refused({"memroy_mode": "both"}, "unknown option --conf memroy_mode", "memory_mode")


def test_bad_conf_value_is_refused():
    _assert_refused({"memory_mode": "everything"}, "--conf memory_mode", "'none', 'sparse', 'dense' or 'both'")


def test_missing_weights_file_is_refused(tmp_path):
    missing = tmp_path / "nowhere.pt"
    _assert_refused({"weights": str(missing)}, str(missing), "no such weights file")


def test_corrupt_weights_file_is_refused(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint" * 100)
    _assert_refused({"weights": str(corrupt)}, str(corrupt), "not a readable torch weights file")


def test_missing_studies_folder_starts_empty_with_a_warning(tmp_path):
    missing = tmp_path / "no-such-studies"
    with MonaiLabelServer(missing, tmp_path / "server.log") as running:
        stats = requests.get(f"{running.url}/datastore/", params={"output": "stats"}, timeout=30).json()
        assert stats["total"] == 0
        assert f"studies folder {missing} holds no images" in running.log()


@pytest.mark.parametrize("port_conf", [{"max_sessions": "0"}, {"session_ttl_s": "soon"}])
def test_bad_session_bounds_are_refused(port_conf):
    (key,) = port_conf
    _assert_refused(port_conf, f"--conf {key}")


def test_own_label_map_from_conf(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text('{"liver": 1, "spleen": 2}')
    with MonaiLabelServer(tmp_path / "studies", tmp_path / "server.log", conf={"labels": str(labels)}) as running:
        info = requests.get(f"{running.url}/info/", timeout=30).json()
    assert info["models"]["mais"]["labels"] == {"background": 0, "liver": 1, "spleen": 2}


def test_bad_label_map_is_refused(tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text('{"liver": 1, "spleen": 1}')
    _assert_refused({"labels": str(labels)}, "index 1 is used twice")
