"""Eight annotators at once on one real server, over HTTP: Slicer and OHIF shapes, three images and labels,
several clicks each. Every annotator's masks must be the ones it gets alone, bit for bit, with no error.

The lone masks come from the shared server, one annotator after the other; the annotators then click together on
a fresh server of their own, so that one also shows another server process answering with the same masks.
MONAI Label answers one infer request at a time; what runs at once here is the interleaving of the annotators'
requests, and their histories: annotators that share a history so far, that part, and OHIF users without client
ids on one image.
"""

from __future__ import annotations

import pytest

from annotators import click_alone, click_together, team
from server import MonaiLabelServer

pytestmark = pytest.mark.server

USERS, CLICKS = 8, 5


@pytest.fixture(scope="module")
def alone(server, studies):
    """{annotator: its requests with the masks it got alone}."""
    return {annotator: click_alone(server.url, studies, annotator, CLICKS)[0] for annotator in team(USERS)}


def test_the_annotators_cover_the_cases_that_could_cross_talk(alone):
    """Shared histories, parting histories, two OHIF users on one image, both client shapes: else the next test
    would pass without showing anything."""
    by_name = {annotator.name: (annotator, requests) for annotator, requests in alone.items()}
    histories = {name: [(r.positives, r.negatives) for r in requests] for name, (_, requests) in by_name.items()}
    assert histories["annotator-0"] == histories["annotator-6"], "annotators 0 and 6 share their whole history"
    assert histories["annotator-0"][0] == histories["annotator-3"][0] != histories["annotator-3"][-1]
    assert histories["annotator-1"][0] == histories["annotator-7"][0]
    assert histories["annotator-1"][-1] != histories["annotator-7"][-1], "two OHIF users part on brain1"
    assert {by_name[name][0].shape for name in ("annotator-1", "annotator-7")} == {"ohif"}
    assert {annotator.shape for annotator in alone} == {"slicer", "ohif"}
    assert all(len(requests) == CLICKS and requests[-1].mask.any() for requests in alone.values())


def test_annotators_clicking_at_once_get_the_masks_they_get_alone(alone, studies, tmp_path):
    with MonaiLabelServer(studies, tmp_path / "together.log") as fresh:
        outcome = click_together(fresh.url, alone)
    assert outcome.errors == []
    assert outcome.mismatches == []
    assert len(outcome.latencies) == USERS * CLICKS
