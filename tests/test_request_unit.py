"""The request shapes Slicer, OHIF and scripts send, and the app's `--conf` settings, without a server."""

from __future__ import annotations

import json

import pytest

from lib.configs.app_settings import TRAINED_WEIGHTS_NAME, AppConfigError, AppSettings
from lib.configs.labels import SAMPLE_LABELS
from lib.infers.request import RequestError, parse_click_request

LABELS = list(SAMPLE_LABELS)


def no_ohif(clicked):
    raise AssertionError("only OHIF's label-less requests need the target resolved")


def test_slicer_deepedit_request_takes_the_current_segment_and_background_clicks():
    request = {name: [] for name in LABELS}
    request.update({"lesion": [[1, 2, 3], [4, 5, 6]], "grey_matter": [[9, 9, 9]], "background": [[7, 8, 9]]})
    request.update({"label": "lesion", "client_id": "slicer-1", "result_extension": ".nrrd"})
    clicks = parse_click_request(request, LABELS, no_ohif)
    assert clicks.label == "lesion" and clicks.client_id == "slicer-1" and clicks.owner == "slicer-1"
    assert clicks.positives == ((1, 2, 3), (4, 5, 6)) and clicks.negatives == ((7, 8, 9),)
    assert (clicks.result_extension, clicks.result_dtype, clicks.reset_state) == (".nrrd", "uint8", False)
    assert clicks.result_compress  # Slicer names no compression: the result comes compressed


def test_a_client_that_asks_for_an_uncompressed_result_gets_one():
    request = {"lesion": [[1, 2, 3]], "background": [], "result_compress": False}  # OHIF's shape
    assert not parse_click_request(request, LABELS, lambda clicked: "lesion").result_compress


def test_ohif_request_asks_for_its_target_and_names_its_owner():
    """OHIF sends no label and no client_id; on a volume uploaded with PUT /session/ MONAI Label adds the
    session, whose name is the request's owner (a preference among the sessions its history may continue)."""
    asked = []

    def target(clicked):
        asked.append(clicked)
        return list(clicked)[-1]

    request = {"lesion": [[1, 2, 3]], "white_matter": [[4, 5, 6]], "background": [], "session": {"name": "s-42"}}
    clicks = parse_click_request(request, LABELS, target)
    assert asked == [{"lesion": [[1, 2, 3]], "white_matter": [[4, 5, 6]]}]
    assert clicks.label == "white_matter" and clicks.positives == ((4, 5, 6),)
    assert clicks.owner == "s-42" and clicks.client_id == "anonymous"
    assert parse_click_request({"lesion": [[1, 2, 3]], "background": []}, LABELS, target).owner == "anonymous"


def test_deepgrow_request_defaults_to_the_first_foreground_label():
    clicks = parse_click_request({"foreground": [[1, 2, 3]], "background": [[3, 2, 1]]}, LABELS, no_ohif)
    assert clicks.label == "lesion" and clicks.positives == ((1, 2, 3),) and clicks.negatives == ((3, 2, 1),)
    labelled = parse_click_request({"foreground": [[1, 2, 3]], "label": "white_matter"}, LABELS, no_ohif)
    assert labelled.label == "white_matter"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"lesion": [[1, 2]], "label": "lesion"}, "lesion[0]"),
        ({"lesion": [[1, 2, -3]], "label": "lesion"}, "lesion[0][2]"),
        ({"foreground": [[1, 2, 3]], "label": "background"}, "label"),
        ({"liver": [[1, 2, 3]], "background": []}, "liver"),
        ({"background": []}, "params"),
        ({"lesion": [[1, 2, 3]], "label": "lesion", "result_dtype": "int8"}, "result_dtype"),
        ({"lesion": [[1, 2, 3]], "label": "lesion", "reset_state": "yes"}, "reset_state"),
    ],
)
def test_a_bad_request_names_its_field(request_, field):
    with pytest.raises(RequestError) as error:
        parse_click_request(request_, LABELS, lambda clicked: next(iter(clicked)))
    assert error.value.field == field


def test_settings_parse_conf_strings_and_refuse_unknown_keys(tmp_path):
    settings = AppSettings.from_conf({"session_ttl_s": "12", "max_sessions": "3", "train_dir": str(tmp_path)})
    assert (settings.session_ttl_s, settings.max_sessions) == (12.0, 3)
    with pytest.raises(AppConfigError, match="unknown option --conf memroy_mode"):
        AppSettings.from_conf({"memroy_mode": "both"})
    with pytest.raises(AppConfigError, match="--conf max_sessions '0'"):
        AppSettings.from_conf({"max_sessions": "0"})


def test_settings_serve_the_published_weights_once_they_exist(tmp_path):
    settings = AppSettings.from_conf({"weights": str(tmp_path / "shipped.pt"), "train_dir": str(tmp_path)})
    assert settings.served_weights() == tmp_path / "shipped.pt"
    (tmp_path / TRAINED_WEIGHTS_NAME).write_bytes(b"")
    assert settings.served_weights() == tmp_path / TRAINED_WEIGHTS_NAME


def test_settings_read_a_label_map_and_name_its_problems(tmp_path):
    path = tmp_path / "labels.json"
    path.write_text(json.dumps({"liver": 1, "spleen": 2}))
    assert AppSettings.from_conf({"labels": str(path)}).label_map() == {"background": 0, "liver": 1, "spleen": 2}
    path.write_text(json.dumps({"liver": 1, "spleen": 1}))
    with pytest.raises(AppConfigError, match="index 1 is used twice"):
        AppSettings.from_conf({"labels": str(path)}).label_map()
    with pytest.raises(AppConfigError, match="file not found"):
        AppSettings.from_conf({"labels": str(tmp_path / "missing.json")}).label_map()
