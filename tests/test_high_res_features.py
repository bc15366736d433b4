"""lib.model.high_res_features: off is SAM-Med3D, fresh features (and a fresh prompt branch or context block)
change nothing, trained ones draw image detail and the clicks into the decoder's mask where they are, the
context spreads them over its neighbourhood and no further, they train through every step, and weights files and
sessions carry them."""

from __future__ import annotations

import pytest
import torch

from lib.clicks.simulator import NEGATIVE, PADDING, POSITIVE
from lib.model.builder import build_mais
from lib.model.config import MaisConfig
from lib.model.high_res_features import HighResFeatures, UpscaledContext, prompt_maps
from lib.model.interaction import InteractionState
from lib.model.weights import load_mais, save_mais
from lib.session.interactive import InteractiveSession
from lib.training.config import FitConfig
from lib.training.initial_model import build_model
from tiny import INSIDE, box_image, interaction_on_noise, tiny_model

COORDS = torch.tensor([[[64.0, 60.0, 70.0], [20.0, 30.0, 40.0]], [[50.0, 50.0, 50.0], [0.0, 0.0, 0.0]]])
LABELS = torch.tensor([[POSITIVE, NEGATIVE], [POSITIVE, PADDING]])


def steps(model, volume, clicks: int = 2):
    """Low-res logits of `clicks` interaction steps on a batch of 2, the clicks of COORDS one at a time."""
    with torch.no_grad():
        state = InteractionState.start(model, batch_size=2, volume=volume)
        embedding = model.embed_image(volume)
        return [state.step(model, embedding, volume, COORDS[:, : k + 1], LABELS[:, : k + 1]).low_res_logits
                for k in range(clicks)]  # fmt: skip


def test_without_them_the_network_is_sam_med3d():
    for config in (MaisConfig.sam_med3d(), MaisConfig.light()):
        model = build_mais(config, device="meta")
        assert model.high_res is None and not any(k.startswith("high_res.") for k in model.state_dict())
        assert model.high_res_features(torch.zeros(1, 1, 128, 128, 128, device="meta")) is None


def assert_a_fresh_part_changes_nothing(trained, extended, part: str) -> None:
    """`extended`, given `trained`'s weights (and so only its weights named `part...` fresh), predicts the same
    masks as `trained` step after step."""
    missing, unexpected = extended.load_state_dict(trained.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(part) for k in missing)
    volume = torch.randn(2, 1, 128, 128, 128)
    for before, after in zip(steps(trained, volume), steps(extended, volume)):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_fresh_features_leave_the_decoder_exactly_as_it_was():
    assert_a_fresh_part_changes_nothing(tiny_model(), tiny_model(high_res_features=True), "high_res.")


def test_trained_features_draw_the_image_into_the_mask_near_its_detail():
    model = tiny_model(high_res_features=True)
    for projection in (model.high_res.project_4, model.high_res.project_8):
        torch.nn.init.normal_(projection.weight, std=0.5)
    volume = torch.randn(2, 1, 128, 128, 128)
    changed = volume.clone()
    changed[:, :, 100:108, 100:108, 100:108] += 5.0  # one 8^3 block of the image, inside a single 16^3 patch
    before, after = steps(model, volume, clicks=1)[0], steps(model, changed, clicks=1)[0]
    difference = (after - before).abs()[0, 0]  # [32, 32, 32]: the change's cells are 25-26
    near = difference[24:28, 24:28, 24:28].max()
    assert near > 1e-3
    # through the stride-4 and stride-8 maps the change stays local; the rest of the mask moves far less (the
    # encoder's patch token changes too and reaches everywhere through the decoder's attention)
    assert difference[:16, :16, :16].max() < near / 5


def test_predict_refuses_features_a_model_has_not_and_wants_those_it_has():
    with_features, plain = tiny_model(high_res_features=True), tiny_model()
    volume = torch.randn(1, 1, 128, 128, 128)
    coords, labels = COORDS[:1, :1], LABELS[:1, :1]
    with torch.no_grad():
        with pytest.raises(ValueError, match="needs high-resolution features"):
            with_features.predict(with_features.embed_image(volume), coords, labels)
        with pytest.raises(ValueError, match="has no high-resolution features"):
            plain.predict(plain.embed_image(volume), coords, labels, high_res=with_features.high_res_features(volume))
    with pytest.raises(ValueError, match="from the crops' volume"):
        InteractionState.start(with_features)


def test_they_train_at_every_step_from_one_computation_per_sample():
    model = tiny_model(high_res_features=True, high_res_prompts=True, high_res_context=True).train()
    # the prompt branch's gradient passes through the projections, which start at zero too: trained ones here
    torch.nn.init.normal_(model.high_res.project_4.weight, std=0.1)
    calls = []
    image_cells = model.high_res.image_cells
    model.high_res.image_cells = lambda volume: calls.append(volume.shape) or image_cells(volume)
    interaction_on_noise(model, clicks=3).loss.backward()
    assert calls == [(2, 1, 128, 128, 128)]  # the crop's part once for the K steps
    context = model.high_res.context.residual
    for layer in (model.high_res.project_4, model.high_res.project_8, model.high_res.prompt_4[-1], context[-1]):
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_prompts_need_the_features_and_a_fresh_branch_changes_nothing():
    with pytest.raises(ValueError, match="needs them"):
        MaisConfig.light(high_res_prompts=True)
    trained = tiny_model(high_res_features=True)
    with_prompts = tiny_model(high_res_features=True, high_res_prompts=True)
    for projection in (trained.high_res.project_4, trained.high_res.project_8):
        torch.nn.init.normal_(projection.weight, std=0.5)  # features that move the mask
    assert_a_fresh_part_changes_nothing(trained, with_prompts, "high_res.prompt_4.")


def test_a_fresh_context_block_changes_nothing_and_needs_the_features():
    with pytest.raises(ValueError, match="needs them"):
        MaisConfig.light(high_res_context=True)
    trained = tiny_model(high_res_features=True, high_res_prompts=True)
    for layer in (trained.high_res.project_4, trained.high_res.project_8, trained.high_res.prompt_4[-1]):
        torch.nn.init.normal_(layer.weight, std=0.5)  # features and prompts that move the mask
    with_context = tiny_model(high_res_features=True, high_res_prompts=True, high_res_context=True)
    assert_a_fresh_part_changes_nothing(trained, with_context, "high_res.context.")


def test_the_context_block_spreads_a_cell_over_its_neighbourhood_and_no_further():
    context = UpscaledContext()
    torch.nn.init.normal_(context.residual[-1].weight, std=0.5)
    upscaled = torch.rand(1, 48, 32, 32, 32)
    changed = upscaled.clone()
    changed[0, :, 16, 16, 16] += 3.0  # one cell, as a click's block or an edge of the image is drawn
    with torch.no_grad():
        difference = (context(changed) - context(upscaled)).abs()[0].amax(0)  # [32, 32, 32]
    reached = torch.nonzero(difference > 0) - 16
    # dilations 1, 2, 4: 7 cells each way (21 mm at 0.75 mm voxels), where the per-cell dot product reaches 0
    assert reached.abs().max() == 7
    assert difference[16, 16, 23] > 0 and difference[16, 16, 9] > 0


def test_prompt_maps_draw_the_clicks_and_the_previous_mask_on_the_decoders_grid():
    previous = torch.full((2, 1, 32, 32, 32), -20.0)
    previous[:, :, 10:20] = 20.0
    maps = prompt_maps(COORDS, LABELS, previous, size=32, crop_size=128)  # [2, 3, 32, 32, 32]
    assert maps.shape == (2, 3, 32, 32, 32)
    assert maps[0, 0, 16, 15, 17] == 1 and maps[0, 0].sum() == 27  # the positive click's 3^3 block, cell 16,15,17
    assert maps[0, 1, 5, 7, 10] == 1 and maps[0, 1].sum() == 27  # the negative one, (20, 30, 40) / 4
    assert maps[1, 0].sum() == 27 and maps[1, 1].sum() == 0  # the padding click beside the positive draws nothing
    assert maps[0, 2, 15].min() > 0.99 and maps[0, 2, 25].max() < -0.99  # inside and outside the previous mask
    assert prompt_maps(COORDS, LABELS, None, size=32, crop_size=128)[:, 2].abs().sum() == 0  # no mask yet


def test_drawn_in_prompts_change_the_features_only_near_where_they_are():
    stem = HighResFeatures(prompts=True)
    torch.nn.init.normal_(stem.prompt_4[-1].weight, std=0.5)
    torch.nn.init.normal_(stem.project_4.weight, std=0.5)
    cells = stem.image_cells(torch.randn(1, 1, 128, 128, 128))
    one_click = prompt_maps(COORDS[:1, :1], LABELS[:1, :1], None, size=32, crop_size=128)
    two_clicks = prompt_maps(COORDS[:1], LABELS[:1], None, size=32, crop_size=128)  # plus a negative at 5, 7, 10
    with torch.no_grad():
        _, before = stem(cells, one_click)
        _, after = stem(cells, two_clicks)
    changed = torch.nonzero((after - before).abs()[0].amax(0) > 0)
    # the click's 3^3 block through the branch's 3^3 convolution: cells 5, 7, 10 +- 2, nowhere else
    assert len(changed) and (changed - torch.tensor([5, 7, 10])).abs().max() <= 2
    with pytest.raises(ValueError, match="prompt maps are for a stem with prompts"):
        HighResFeatures()(cells, one_click)


def test_training_adds_them_to_weights_without_and_the_file_keeps_them(tmp_path):
    old = save_mais(tiny_model(), tmp_path / "old.pt")
    assert not load_mais(old).config.high_res_features  # files without the field load as SAM-Med3D's network
    added = build_model(FitConfig(init=old, high_res_features=True, memory_size=8), torch.device("cpu"))
    assert added.config.high_res_features and added.high_res.project_4.weight.abs().sum() == 0
    kept = save_mais(added, tmp_path / "with_features.pt")
    assert load_mais(kept).config.high_res_features
    assert build_model(FitConfig(init=kept, memory_size=8), torch.device("cpu")).config.high_res_features
    dropped = build_model(FitConfig(init=kept, high_res_features=False, memory_size=8), torch.device("cpu"))
    assert dropped.high_res is None
    with_context = build_model(
        FitConfig(init=kept, high_res_prompts=True, high_res_context=True, memory_size=8), torch.device("cpu")
    )
    assert with_context.high_res.context.residual[-1].weight.abs().sum() == 0  # fresh, at zero
    kept_context = save_mais(with_context, tmp_path / "with_context.pt")
    assert load_mais(kept_context).high_res.context is not None
    assert build_model(FitConfig(init=kept_context, memory_size=8), torch.device("cpu")).config.high_res_context


def test_a_session_computes_them_once_a_window_and_counts_their_bytes(tmp_path):
    image = box_image(tmp_path / "box.nii.gz")
    without = InteractiveSession(image, tiny_model())
    without.apply([INSIDE], [])
    # the finished features without prompts, the cells that each step finishes with its prompt with them
    for prompts, nbytes in ((False, (96 * 16**3 + 48 * 32**3) * 4), (True, 16 * 32**3 * 4)):
        session = InteractiveSession(image, tiny_model(high_res_features=True, high_res_prompts=prompts))
        session.apply([INSIDE], [])
        extra = session.nbytes_by_part()["window embeddings"] - without.nbytes_by_part()["window embeddings"]
        assert extra == nbytes
        kept = session.windows[0].interaction.high_res
        session.apply([INSIDE, (INSIDE[0] + 2, *INSIDE[1:])], [])  # a second click in the same window
        assert session.windows[0].interaction.high_res is kept
