"""lib.model.refinement: off is SAM-Med3D, a fresh head changes nothing, it sees clicks and image, it trains."""

from __future__ import annotations

import torch

from lib.clicks.simulator import NEGATIVE, PADDING, POSITIVE
from lib.model.builder import build_mais
from lib.model.config import MaisConfig
from lib.model.interaction import InteractionState
from lib.model.refinement import click_maps
from lib.model.weights import load_mais, save_mais
from lib.session.interactive import InteractiveSession
from lib.training.config import FitConfig
from lib.training.initial_model import build_model
from tiny import INSIDE, box_image, interaction_on_noise, tiny_model


def one_step(model, volume, coords, labels):
    with torch.no_grad():
        return InteractionState.start(model).step(model, model.embed_image(volume), volume, coords, labels)


def test_without_the_head_the_network_and_its_masks_are_sam_med3d():
    for config in (MaisConfig.sam_med3d(), MaisConfig.light(refinement=False)):
        model = build_mais(config, device="meta")
        assert model.refinement is None and not any(k.startswith("refinement.") for k in model.state_dict())
    model = tiny_model()
    volume = torch.randn(1, 1, 128, 128, 128)
    out = one_step(model, volume, torch.tensor([[[64.0, 60.0, 70.0]]]), torch.tensor([[POSITIVE]]))
    assert torch.equal(out.logits, model.upsample_logits(out.low_res_logits))


def test_a_fresh_head_leaves_the_decoder_mask_exactly_as_it_was():
    model = tiny_model(refinement=True)
    volume = torch.randn(1, 1, 128, 128, 128)
    out = one_step(model, volume, torch.tensor([[[64.0, 60.0, 70.0]]]), torch.tensor([[POSITIVE]]))
    assert torch.equal(out.logits, model.upsample_logits(out.low_res_logits))


def test_the_head_sees_the_image_and_the_clicks():
    head = tiny_model(refinement=True).refinement
    torch.nn.init.normal_(head.coefficients.weight, std=0.5)
    volume, logits = torch.randn(1, 1, 128, 128, 128), torch.randn(1, 1, 128, 128, 128)
    coords = torch.tensor([[[64.0, 60.0, 70.0], [20.0, 30.0, 40.0]]])
    with torch.no_grad():
        base = head(volume, logits, coords, torch.tensor([[POSITIVE, NEGATIVE]]))
        other_image = head(volume.flip(-1), logits, coords, torch.tensor([[POSITIVE, NEGATIVE]]))
        other_label = head(volume, logits, coords, torch.tensor([[POSITIVE, POSITIVE]]))
    assert not torch.allclose(base, other_image)
    # the second click's label changes the residual around that click, not far from it
    near, far = (0, 0, 20, 30, 40), (0, 0, 100, 100, 100)
    assert other_label[near] != base[near]
    assert other_label[far] == base[far]


def test_click_maps_draw_each_click_on_its_own_channel_and_skip_padding():
    coords = torch.tensor([[[64.0, 64.0, 64.0], [10.0, 127.0, 0.0], [90.0, 90.0, 90.0]]])
    maps = click_maps(coords, torch.tensor([[POSITIVE, NEGATIVE, PADDING]]), size=64, crop_size=128)
    assert maps.shape == (1, 2, 64, 64, 64)
    assert maps[0, 0, 31:34, 31:34, 31:34].eq(1).all() and maps[0, 0].sum() == 27  # a 3^3 block
    assert maps[0, 1, 5, 63, 0] == 1 and maps[0, 1].sum() == 2 * 2 * 3  # cut by the crop's faces
    assert maps[0, :, 45, 45, 45].eq(0).all()  # the padding click drew nothing


def test_the_head_trains_at_one_step_of_a_sequence_and_validation_refines_every_step():
    model = tiny_model(refinement=True).train()
    calls = []
    refinement_forward = model.refinement.forward
    model.refinement.forward = lambda *args: calls.append(torch.is_grad_enabled()) or refinement_forward(*args)
    interaction_on_noise(model, clicks=3).loss.backward()
    assert calls == [True]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.refinement.coefficients.parameters())
    calls.clear()
    with torch.no_grad():
        interaction_on_noise(model, clicks=3)
    assert calls == [False] * 3


def test_training_adds_a_head_to_weights_without_one_and_can_drop_it(tmp_path):
    old = save_mais(tiny_model(), tmp_path / "old.pt")
    assert not load_mais(old).config.refinement  # files without the field load as SAM-Med3D's network
    added = build_model(FitConfig(init=old, refinement=True, memory_size=8), torch.device("cpu"))
    assert added.config.refinement and added.refinement.coefficients.weight.abs().sum() == 0
    kept = save_mais(added, tmp_path / "with_head.pt")
    assert build_model(FitConfig(init=kept, memory_size=8), torch.device("cpu")).config.refinement
    dropped = build_model(FitConfig(init=kept, refinement=False, memory_size=8), torch.device("cpu"))
    assert dropped.refinement is None


def test_a_session_keeps_its_windows_volume_for_the_head_only(tmp_path):
    image = box_image(tmp_path / "box.nii.gz")
    with_head = InteractiveSession(image, tiny_model(refinement=True))
    without = InteractiveSession(image, tiny_model())
    for session in (with_head, without):
        session.apply([INSIDE], [])
    assert with_head.windows[0].volume.shape == (1, 1, 128, 128, 128)
    assert with_head.nbytes_by_part()["window volumes"] == 128**3 * 4
    assert without.windows[0].volume is None and without.nbytes_by_part()["window volumes"] == 0
