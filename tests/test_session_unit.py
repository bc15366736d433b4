"""Sessions without a server: the interaction step every caller runs, an interactive session on a tiny model,
click-history reconciliation and the session store (with its own clock instead of waiting)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from lib.activelearning.disagreement import click_disagreement
from lib.clicks.history import common_prefix
from lib.clicks.simulator import NEGATIVE, POSITIVE, Click, first_click, next_click
from lib.evaluation.interactive import evaluate_structure
from lib.model.interaction import InteractionState, prompt_points
from lib.session.interactive import InteractiveSession
from lib.session.store import SessionScope, SessionStore
from lib.training.interaction_loop import InteractionConfig, run_interaction
from lib.training.real_data import StructureCrop
from lib.training.validation import validate
from tiny import IMAGE_SHAPE, INSIDE, box_image, box_truth, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return box_image(tmp_path_factory.mktemp("images") / "box.nii.gz")


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
        # a session (the evaluation runs one) keeps its windows' volumes for a model with the refinement head only
        # (tests/test_refinement.py)
        if caller not in ("session", "evaluation"):
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


def test_a_sessions_bytes_count_everything_it_holds_its_windows_included(model, image):
    """What max_session_mb bounds: the image in model space, logits and mask, and per window its volume (kept for
    a model with the refinement head only: tests/test_refinement.py), embedding, memory and last low-res
    logits."""
    session = InteractiveSession(image, model)
    empty = session.nbytes_by_part()
    assert empty["image"] == image.nbytes > 0 and empty["window volumes"] == 0
    session.apply([INSIDE], [])
    parts = session.nbytes_by_part()
    (window,) = session.windows
    assert parts["window volumes"] == 0  # no refinement head
    assert parts["window embeddings"] == window.image_embedding.numel() * 4
    assert parts["window memories"] == window.interaction.memory.nbytes() > 0
    assert parts["window low-res logits"] == 32**3 * window.interaction.low_res_logits.element_size()
    assert session.nbytes == sum(parts.values())


# ------------------------------------------------------------------------------------------- click history


def test_new_clicks_come_after_the_applied_ones_positives_first():
    applied = [Click((1, 1, 1), POSITIVE), Click((2, 2, 2), NEGATIVE)]
    prefix, rest = common_prefix(applied, [(1, 1, 1), (3, 3, 3)], [(2, 2, 2), (4, 4, 4)])
    assert prefix == applied
    assert rest == [Click((3, 3, 3), POSITIVE), Click((4, 4, 4), NEGATIVE)]


def test_after_a_removed_click_the_request_orders_the_rest():
    applied = [Click((1, 1, 1), POSITIVE), Click((2, 2, 2), NEGATIVE), Click((5, 5, 5), POSITIVE)]
    prefix, rest = common_prefix(applied, [(5, 5, 5), (6, 6, 6)], [(2, 2, 2)])
    # the first click was undone: no prefix is left, and the rest comes positives first, as for a newcomer
    assert prefix == [] and rest == [applied[2], Click((6, 6, 6), POSITIVE), applied[1]]


def test_after_an_undo_a_session_replays_what_a_newcomer_with_that_request_gets(model, image):
    """The session orders a request as the session store does (`common_prefix`): when the first click is removed,
    nothing of the applied order is a prefix any more, so the rest replays positives first, as for a newcomer."""
    session = InteractiveSession(image, model)
    positive, negative, later = INSIDE, (5, 5, 5), (16, 18, 14)
    session.apply([positive], [])
    session.apply([positive], [negative])
    session.apply([positive, later], [negative])
    update = session.apply([later], [negative])
    assert update.steps_run == 2
    assert session.clicks == [Click(later, POSITIVE), Click(negative, NEGATIVE)]
    newcomer = InteractiveSession(image, model)
    newcomer.apply([later], [negative])
    np.testing.assert_array_equal(session.mask, newcomer.mask)


def test_a_click_placed_twice_counts_twice():
    applied = [Click((1, 1, 1), POSITIVE)]
    assert common_prefix(applied, [(1, 1, 1), (1, 1, 1)], []) == (applied, applied)
    assert common_prefix(applied * 2, [(1, 1, 1)], []) == (applied, [])


def test_an_identical_history_adds_nothing():
    applied = [Click((1, 1, 1), POSITIVE), Click((2, 2, 2), NEGATIVE)]
    assert common_prefix(applied, [(1, 1, 1)], [(2, 2, 2)]) == (applied, [])
    assert common_prefix([], [(1, 1, 1)], [(2, 2, 2)]) == ([], [Click((1, 1, 1), POSITIVE), Click((2, 2, 2), NEGATIVE)])


# -------------------------------------------------------------------------------------------- session store

SCOPE = SessionScope("/images/box.nii.gz", "lesion", "weights@1")
P1, P2, P3, P4 = INSIDE, (11, 13, 9), (18, 20, 16), (12, 19, 10)
N1, N2 = (25, 25, 25), (3, 4, 5)


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def click(store, model, image, owner, positives, negatives=(), reset=False, scope=SCOPE):
    """One request through the store as the infer task makes it: (session, steps run, mask)."""
    request = store.continued(scope, positives, negatives, owner, lambda: InteractiveSession(image, model), reset)
    with request as (session, history):
        update = session.advance(history)
        return session, update.steps_run, session.mask.copy()


def lone_masks(model, image, requests):
    """The masks a lone user gets for these requests ((positives, negatives) each), in one session of its own."""
    session = InteractiveSession(image, model)
    masks = []
    for positives, negatives in requests:
        session.apply(positives, negatives)
        masks.append(session.mask.copy())
    return masks


def big_store(clock=time.monotonic):
    return SessionStore(ttl_s=100, max_sessions=16, max_bytes=2**40, clock=clock)


def test_a_request_continues_whoevers_session_its_history_extends(model, image):
    """No client id keys a session: the OHIF user who sends the history another client built continues it,
    running only the new click, and gets the mask a lone user gets."""
    store = big_store()
    first, _, _ = click(store, model, image, "slicer-a", [P1])
    continued, steps, mask = click(store, model, image, "anonymous", [P1, P2])
    assert continued is first and steps == 1 and len(store) == 1
    np.testing.assert_array_equal(mask, lone_masks(model, image, [([P1], []), ([P1, P2], [])])[1])


def test_a_session_is_only_continued_by_a_request_that_carries_its_whole_history(model, image):
    store = big_store()
    theirs, _, _ = click(store, model, image, "alice", [P1, P2])
    for guess in ([P2], [P1, P3], [P2, P3]):  # a click of it, or a shorter history: someone else's session
        mine, _, mask = click(store, model, image, "alice", guess)
        assert mine is not theirs
        np.testing.assert_array_equal(mask, lone_masks(model, image, [(guess, [])])[0])
    assert theirs.clicks == [Click(P1, POSITIVE), Click(P2, POSITIVE)], "nobody else changed it"
    for scope in (SCOPE._replace(label="white_matter"), SCOPE._replace(weights="weights@2")):
        assert click(store, model, image, "alice", [P1, P2, P3], scope=scope)[0] is not theirs


def test_the_longest_session_the_history_extends_wins(model, image):
    store = big_store()
    click(store, model, image, "u1", [P1])
    two, _, _ = click(store, model, image, "u2", [P1, P2])
    click(store, model, image, "u3", [P1, P3])
    session, steps, _ = click(store, model, image, "u4", [P1, P2, P4])
    assert session is two and steps == 1


def test_users_with_one_history_share_a_session_until_they_diverge(model, image):
    """Two users with identical histories so far continue one session; when they diverge the first extends
    it, the second replays its own: both get the masks a lone user gets, bit for bit."""
    store = big_store()
    shared, _, _ = click(store, model, image, "x", [P1])
    assert click(store, model, image, "y", [P1])[:2] == (shared, 0)
    x_session, x_steps, x_mask = click(store, model, image, "x", [P1, P2], [N1])
    y_session, y_steps, y_mask = click(store, model, image, "y", [P1, P3], [N1])
    assert x_session is shared and x_steps == 2
    assert y_session is not shared and y_steps == 3
    np.testing.assert_array_equal(x_mask, lone_masks(model, image, [([P1], []), ([P1, P2], [N1])])[1])
    np.testing.assert_array_equal(y_mask, lone_masks(model, image, [([P1], []), ([P1, P3], [N1])])[1])
    assert click(store, model, image, "x", [P1, P2, P4], [N1])[:2] == (shared, 1)
    assert click(store, model, image, "y", [P1, P3, P4], [N1])[:2] == (y_session, 1)


def test_an_undo_restores_the_earlier_mask_and_leaves_the_session_to_others(model, image):
    """The history minus its last click is a prefix of no session: it is replayed in the order the session
    applied it (a negative before a later positive), in a session of its own; the longer one stays."""
    store = big_store()
    requests = [([P1], []), ([P1], [N1]), ([P1, P2], [N1]), ([P1, P2], [N1, N2])]
    masks = [click(store, model, image, "u", *request)[2] for request in requests]
    np.testing.assert_array_equal(masks[-1], lone_masks(model, image, requests)[-1])
    longer, _, _ = click(store, model, image, "v", *requests[-1])
    undone, steps, mask = click(store, model, image, "u", *requests[2])
    assert undone is not longer and steps == 3
    assert undone.clicks == [Click(P1, POSITIVE), Click(N1, NEGATIVE), Click(P2, POSITIVE)]
    np.testing.assert_array_equal(mask, masks[2])
    assert click(store, model, image, "v", [P1, P2, P3], [N1, N2])[:2] == (longer, 1)


def test_reset_state_starts_a_new_session_from_the_whole_history(model, image):
    store = big_store()
    kept, _, _ = click(store, model, image, "u", [P1, P2])
    reset, steps, mask = click(store, model, image, "u", [P1, P2], reset=True)
    assert reset is not kept and steps == 2
    np.testing.assert_array_equal(mask, lone_masks(model, image, [([P1, P2], [])])[0])
    assert click(store, model, image, "u", [])[2].sum() == 0


def test_a_request_waits_for_a_busy_session_and_replays_its_own_if_it_was_extended_past_it(model, image):
    """One request at a time uses a session: a second one waits; if the first took the session to a history
    the second does not carry, the second replays its own instead of continuing someone else's clicks."""
    store = big_store()
    shared, _, _ = click(store, model, image, "x", [P1])
    results = {}

    def y(positives):
        results[tuple(positives)] = click(store, model, image, "y", positives)

    x_request = store.continued(SCOPE, [P1, P2], [], "x", lambda: pytest.fail("x's session is stored"))
    with x_request as (session, history):
        assert session is shared
        waiting = [threading.Thread(target=y, args=(positives,)) for positives in ([P1, P3], [P1, P2])]
        for thread in waiting:
            thread.start()
        time.sleep(0.3)
        assert all(thread.is_alive() for thread in waiting), "a request used a session another one holds"
        session.advance(history)
    for thread in waiting:
        thread.join(timeout=60)
    diverged, steps, mask = results[(P1, P3)]
    assert diverged is not shared and steps == 2
    np.testing.assert_array_equal(mask, lone_masks(model, image, [([P1, P3], [])])[0])
    assert results[(P1, P2)][:2] == (shared, 0)


def test_an_idle_session_expires_after_its_ttl(model, image):
    clock = Clock()
    store = SessionStore(ttl_s=10, max_sessions=4, max_bytes=2**40, clock=clock)
    first, _, _ = click(store, model, image, "u", [P1])
    clock.now = 9.0
    assert click(store, model, image, "u", [P1])[0] is first
    clock.now = 19.5  # 10.5 s after its last use
    assert click(store, model, image, "u", [P1])[:2] != (first, 0)


def test_the_least_recently_used_session_is_evicted_beyond_max_sessions(model, image):
    store = SessionStore(ttl_s=100, max_sessions=2, max_bytes=2**40)
    one, _, _ = click(store, model, image, "u1", [P1])
    two, _, _ = click(store, model, image, "u2", [P2])
    click(store, model, image, "u1", [P1])  # used again: [P2]'s session is now the oldest
    click(store, model, image, "u3", [P3])
    assert len(store) == 2
    assert click(store, model, image, "u1", [P1])[0] is one
    assert click(store, model, image, "u2", [P2])[:2] != (two, 0), "[P2]'s session was evicted"


def test_a_session_that_grows_counts_against_the_byte_bound(model, image):
    """Sessions grow by a window (embedding + memory) with their first click: the bound is re-checked after
    the request, not only when a session is created."""
    fresh = InteractiveSession(image, model).nbytes
    store = SessionStore(ttl_s=100, max_sessions=8, max_bytes=2 * fresh + fresh // 10)
    click(store, model, image, "idle", [], scope=SCOPE._replace(label="white_matter"))
    busy, _, _ = click(store, model, image, "busy", [P2])
    assert busy.nbytes > fresh + fresh // 10
    assert len(store) == 1 and store.nbytes == busy.nbytes
    assert click(store, model, image, "busy", [P2])[0] is busy


def test_a_session_over_the_byte_bound_alone_is_kept(model, image):
    store = SessionStore(ttl_s=100, max_sessions=8, max_bytes=1)
    only, _, _ = click(store, model, image, "only", [P1])
    assert click(store, model, image, "only", [P1])[:2] == (only, 0)


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


def test_every_part_of_the_mask_holds_a_positive_click():
    """Parts of the mask that no positive click lies in are not what the user clicked: after the first click
    on brain1's lesion the shipped weights also draw voxels apart from it, and the session drops them."""
    from scipy import ndimage

    from lib.imaging import ModelSpaceImage
    from lib.model.weights import load_mais
    from server import APP_DIR, SAMPLE_DATA

    shipped = load_mais(APP_DIR / "model" / "mais_light.pt")
    session = InteractiveSession(ModelSpaceImage.from_file(str(SAMPLE_DATA / "brain1.nrrd")), shipped)
    click = Click((192, 98, 14), POSITIVE)
    session.add_click(click)
    parts, count = ndimage.label(session.mask, structure=np.ones((3, 3, 3), dtype=bool))
    assert count == 1 and parts[click.coord] == 1, (count, int(session.mask.sum()))
