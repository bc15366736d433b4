"""Sessions without a server: the interaction step every caller runs, an interactive session on a tiny model,
click-history reconciliation and the session store (with its own clock instead of waiting)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib.activelearning.disagreement import click_disagreement
from lib.clicks.history import reconcile
from lib.clicks.simulator import NEGATIVE, POSITIVE, Click, first_click, next_click
from lib.evaluation.interactive import evaluate_structure
from lib.imaging import ModelSpaceImage
from lib.model.interaction import InteractionState, prompt_points
from lib.session.interactive import InteractiveSession
from lib.session.store import SessionKey, SessionStore
from lib.training.interaction_loop import InteractionConfig, run_interaction
from lib.training.real_data import StructureCrop
from lib.training.validation import validate
from tiny import IMAGE_SHAPE, INSIDE, box_truth, tiny_model, write_box_image


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return ModelSpaceImage.from_file(str(write_box_image(tmp_path_factory.mktemp("images") / "box.nii.gz")))


# ------------------------------------------------------------------------------------ the interaction step


def run_session(model, image):
    session = InteractiveSession(image, model)
    session.apply([INSIDE], [])
    session.apply([INSIDE, (11, 13, 9)], [])


def run_training_loop(model, image):
    masks = torch.zeros((2, 1, 128, 128, 128), dtype=torch.bool)
    masks[:, :, 40:70, 50:80, 30:60] = True
    volumes = torch.randn(2, 1, 128, 128, 128)
    embeddings = model.embed_image(volumes)
    run_interaction(model, embeddings, volumes, masks, np.random.default_rng(0), InteractionConfig(num_clicks=2))


def run_validation(model, image):
    mask = torch.zeros((1, 128, 128, 128), dtype=torch.bool)
    mask[:, 40:70, 50:80, 30:60] = True
    validate(model, [StructureCrop(torch.randn(1, 128, 128, 128), mask, "box")], num_clicks=2, step=0)


def run_evaluation(model, image):
    evaluate_structure(model, image, box_truth(), "box", "center", clicks=2)


def run_active_learning(model, image):
    click_disagreement(model, image, np.array([40, 40, 40]), offset_voxels=3)


# caller -> (batch size, clicks the step was given at each step)
CALLERS = {
    "session": (run_session, 1, [1, 2]),
    "training loop": (run_training_loop, 2, [1, 2]),
    "validation": (run_validation, 1, [1, 2]),
    "evaluation": (run_evaluation, 1, [1, 2]),
    "active learning": (run_active_learning, 7, [1]),  # one first click, repeated at six offsets
}


@pytest.mark.parametrize("caller", list(CALLERS))
def test_every_caller_runs_the_one_interaction_step(model, image, caller, monkeypatch):
    """The server's session, the training loop, validation, the evaluation and active learning all predict
    through `InteractionState.step`, one call per click, with the clicks so far, the newest last, and the
    volumes the embeddings were made of (what the refinement head sees)."""
    run, batch_size, clicks_per_step = CALLERS[caller]
    calls = []
    step = InteractionState.step

    def spy(state, model, image_embeddings, volume, click_coords, click_labels, refine=True):
        assert volume.shape == (image_embeddings.shape[0], 1, 128, 128, 128)
        calls.append((click_coords.shape[0], click_coords.shape[1], len(state.memory)))
        return step(state, model, image_embeddings, volume, click_coords, click_labels, refine)

    monkeypatch.setattr(InteractionState, "step", spy)
    run(model, image)
    assert [c[0] for c in calls] == [batch_size] * len(clicks_per_step)
    assert [c[1] for c in calls] == clicks_per_step
    assert [c[2] for c in calls] == list(range(len(clicks_per_step))), "one memory entry per earlier step"


def test_the_prompt_gets_all_clicks_or_only_the_newest():
    coords = torch.arange(2 * 3 * 3, dtype=torch.float32).reshape(2, 3, 3)
    labels = torch.tensor([[1, 0, 1], [1, 1, -1]])
    assert prompt_points(coords, labels, "all")[0] is coords
    latest_coords, latest_labels = prompt_points(coords, labels, "latest")
    assert torch.equal(latest_coords, coords[:, 2:]) and latest_labels.tolist() == [[1], [-1]]
    with pytest.raises(ValueError, match="prompt_clicks 'newest'"):
        prompt_points(coords, labels, "newest")


def test_a_step_pushes_one_memory_entry_and_keeps_its_logits(model):
    state = InteractionState.start(model)
    volume = torch.randn(1, 1, 128, 128, 128)
    embedding = model.embed_image(volume)
    with torch.inference_mode():
        out = state.step(model, embedding, volume, torch.tensor([[[64.0, 64.0, 64.0]]]), torch.tensor([[POSITIVE]]))
    assert len(state.memory) == 1
    assert state.low_res_logits.shape == (1, 1, 32, 32, 32) and torch.equal(state.low_res_logits, out.low_res_logits)


# ------------------------------------------------------------------------------------- interactive session


@pytest.mark.parametrize("field", ["clicks", "windows", "logits", "mask"])
def test_a_session_is_built_from_image_and_model_only(model, image, field):
    """State is the session's own: a constructor that took it and threw it away invited wrong use."""
    with pytest.raises(TypeError):
        InteractiveSession(image, model, **{field: None})


def test_a_session_applies_a_history_and_says_what_changed(model, image):
    session = InteractiveSession(image, model)
    first, second = INSIDE, (11, 13, 9)
    update = session.apply([first], [])
    assert update.steps_run == 1 and session.clicks == [Click(first, POSITIVE)]
    assert update.predict_s > 0 and update.to_grid_s > 0
    one_click = session.mask.copy()

    update = session.apply([first, second], [])  # a resent history: only the new click runs
    assert update.steps_run == 1 and len(session.clicks) == 2
    lo, hi = update.changed_box
    outside = np.ones(IMAGE_SHAPE, dtype=bool)
    outside[tuple(slice(a, b) for a, b in zip(lo, hi))] = False
    np.testing.assert_array_equal(session.mask[outside], one_click[outside])

    update = session.apply([first], [])  # the user removed the second click: replayed from the first
    assert update.steps_run == 1 and update.changed_box == ((0, 0, 0), IMAGE_SHAPE)
    np.testing.assert_array_equal(session.mask, one_click)

    update = session.apply([first], [], reset=True)
    assert update.steps_run == 1
    np.testing.assert_array_equal(session.mask, one_click)
    assert session.apply([], []).steps_run == 0 and not session.mask.any() and not session.clicks


# ------------------------------------------------------------------------------------------- click history


def test_reconcile_runs_only_new_clicks_positives_first():
    applied = [Click((1, 1, 1), POSITIVE), Click((2, 2, 2), NEGATIVE)]
    update = reconcile(applied, [(1, 1, 1), (3, 3, 3)], [(2, 2, 2), (4, 4, 4)])
    assert update.replay is None
    assert update.new == [Click((3, 3, 3), POSITIVE), Click((4, 4, 4), NEGATIVE)]


def test_reconcile_replays_when_a_click_disappeared():
    applied = [Click((1, 1, 1), POSITIVE), Click((2, 2, 2), NEGATIVE), Click((5, 5, 5), POSITIVE)]
    update = reconcile(applied, [(5, 5, 5), (6, 6, 6)], [(2, 2, 2)])
    # kept clicks keep their arrival order, whatever the request's order; the new one comes after
    assert update.new == [] and update.replay == [applied[1], applied[2], Click((6, 6, 6), POSITIVE)]


def test_reconcile_counts_a_click_placed_twice_twice():
    applied = [Click((1, 1, 1), POSITIVE)]
    assert reconcile(applied, [(1, 1, 1), (1, 1, 1)], []).new == [Click((1, 1, 1), POSITIVE)]
    assert reconcile(applied * 2, [(1, 1, 1)], []).replay == applied


def test_reconcile_of_an_identical_history_does_nothing():
    applied = [Click((1, 1, 1), POSITIVE), Click((2, 2, 2), NEGATIVE)]
    update = reconcile(applied, [(1, 1, 1)], [(2, 2, 2)])
    assert update.new == [] and update.replay is None


# -------------------------------------------------------------------------------------------- session store


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def key(owner: str) -> SessionKey:
    return SessionKey(owner, "/images/box.nii.gz", "lesion")


def test_an_idle_session_expires_after_its_ttl(model, image):
    clock = Clock()
    store = SessionStore(ttl_s=10, max_sessions=4, max_bytes=2**40, clock=clock)
    first = store.claim(key("u"), lambda: InteractiveSession(image, model))
    clock.now = 9.0
    assert store.claim(key("u"), lambda: pytest.fail("a live session was recreated")) is first
    clock.now = 19.5  # 10.5 s after its last use
    assert store.get(key("u")) is None
    assert store.claim(key("u"), lambda: InteractiveSession(image, model)) is not first


def test_the_least_recently_used_session_is_evicted_beyond_max_sessions(model, image):
    clock = Clock()
    store = SessionStore(ttl_s=100, max_sessions=2, max_bytes=2**40, clock=clock)
    for owner in ("u1", "u2"):
        store.claim(key(owner), lambda: InteractiveSession(image, model))
    store.claim(key("u1"), lambda: pytest.fail("u1 is stored"))  # u1 used again: u2 is now the oldest
    store.claim(key("u3"), lambda: InteractiveSession(image, model))
    assert store.get(key("u2")) is None and store.get(key("u1")) and store.get(key("u3"))


def test_a_session_that_grows_counts_against_the_byte_bound(model, image):
    """Sessions grow by a window (embedding + memory) with their first click: the bound is re-checked after
    the request, not only when a session is created."""
    fresh = InteractiveSession(image, model).nbytes
    store = SessionStore(ttl_s=100, max_sessions=8, max_bytes=2 * fresh + fresh // 10)
    store.claim(key("idle"), lambda: InteractiveSession(image, model))
    entry = store.claim(key("busy"), lambda: InteractiveSession(image, model))
    assert len(store) == 2
    with entry.lock:
        entry.session.apply([INSIDE], [])
    assert entry.session.nbytes > fresh + fresh // 10
    store.enforce_bounds(keep=key("busy"))
    assert store.get(key("idle")) is None and store.get(key("busy")) is entry


def test_a_session_over_the_byte_bound_alone_is_kept(model, image):
    store = SessionStore(ttl_s=100, max_sessions=8, max_bytes=1)
    entry = store.claim(key("only"), lambda: InteractiveSession(image, model))
    store.enforce_bounds(keep=key("only"))
    assert store.get(key("only")) is entry


# ---------------------------------------------------------------------------------------- click simulation


def test_an_unknown_click_rule_is_refused_not_taken_for_random():
    gt = box_truth()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown click rule 'centre'"):
        first_click(gt, rng, "centre")
    with pytest.raises(ValueError, match="unknown click rule 'centre'"):
        next_click(gt, np.zeros_like(gt), rng, "centre")


def test_an_empty_structure_is_refused_by_name(model, image):
    with pytest.raises(ValueError, match="box: the structure is empty"):
        evaluate_structure(model, image, np.zeros(IMAGE_SHAPE, dtype=bool), "box", "center", clicks=2)
    with pytest.raises(ValueError, match="unknown click preset 'psychic'"):
        evaluate_structure(model, image, box_truth(), "box", "psychic", clicks=2)
