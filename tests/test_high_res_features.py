"""lib.model.high_res_features: off is SAM-Med3D, fresh features change nothing, trained ones draw image detail
into the decoder's mask, they train through every step, and weights files and sessions carry them."""

from __future__ import annotations

import pytest
import torch

from lib.clicks.simulator import NEGATIVE, PADDING, POSITIVE
from lib.model.builder import build_mais
from lib.model.config import MaisConfig
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


def test_fresh_features_leave_the_decoder_exactly_as_it_was():
    plain, with_features = tiny_model(), tiny_model(high_res_features=True)
    missing, unexpected = with_features.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("high_res.") for k in missing)
    volume = torch.randn(2, 1, 128, 128, 128)
    for before, after in zip(steps(plain, volume), steps(with_features, volume)):
        torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


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
    model = tiny_model(high_res_features=True).train()
    calls = []
    stem_forward = model.high_res.forward
    model.high_res.forward = lambda volume: calls.append(volume.shape) or stem_forward(volume)
    interaction_on_noise(model, clicks=3).loss.backward()
    assert calls == [(2, 1, 128, 128, 128)]  # once for the K steps
    for projection in (model.high_res.project_4, model.high_res.project_8):
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0


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


def test_a_session_computes_them_once_a_window_and_counts_their_bytes(tmp_path):
    image = box_image(tmp_path / "box.nii.gz")
    with_features, without = (
        InteractiveSession(image, tiny_model(high_res_features=True)),
        InteractiveSession(image, tiny_model()),
    )
    for session in (with_features, without):
        session.apply([INSIDE], [])
    stride_8, stride_4 = with_features.windows[0].interaction.high_res
    assert stride_8.shape == (1, 96, 16, 16, 16) and stride_4.shape == (1, 48, 32, 32, 32)
    extra = with_features.nbytes_by_part()["window embeddings"] - without.nbytes_by_part()["window embeddings"]
    assert extra == (96 * 16**3 + 48 * 32**3) * 4
    features = with_features.windows[0].interaction.high_res
    with_features.apply([INSIDE, (INSIDE[0] + 2, *INSIDE[1:])], [])  # a second click in the same window
    assert with_features.windows[0].interaction.high_res is features
