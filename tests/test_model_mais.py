"""lib.model.mais: mode "none" is SAM-Med3D, the memory changes the output, undo, batches and training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from medim.models.sam_med3d import MaskDecoder3D, PromptEncoder3D

from lib.model.builder import build_mais
from lib.model.config import MaisConfig
from lib.model.prompts import embed_prompts


def make_model(mode: str = "both", memory_size: int = 60, seed: int = 0):
    """Light model with random weights, the memory output projection included (zero after the build)."""
    torch.manual_seed(seed)
    model = build_mais(MaisConfig.light(memory_mode=mode, memory_size=memory_size))
    with torch.no_grad():
        model.memory_attention.out_proj.weight.normal_(0, 0.05)
        model.memory_attention.out_proj.bias.normal_(0, 0.05)
    return model


def with_mode(model, mode: str):
    model.config = dataclasses.replace(model.config, memory_mode=mode)
    return model


def clicks(batch_size: int = 1, n: int = 1, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    coords = torch.randint(0, 128, (batch_size, n, 3), generator=gen).float()
    labels = torch.randint(0, 2, (batch_size, n), generator=gen)
    return coords, labels


def run_session(model, emb, steps: int, seed: int = 0):
    """`steps` interactions, pushing each entry; returns the memory and the last low-res logits."""
    memory = model.new_memory(emb.shape[0])
    prev = None
    with torch.no_grad():
        for step in range(steps):
            out = model.predict(emb, *clicks(emb.shape[0], seed=seed + step), prev, memory)
            memory.push(out.memory_entry)
            prev = out.low_res_logits
    return memory, prev


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def emb():
    return torch.randn(1, 384, 8, 8, 8, generator=torch.Generator().manual_seed(5))


def test_mode_none_is_exactly_plain_sam_med3d(model, emb):
    """Same weights in medim's own PromptEncoder3D + MaskDecoder3D give the same logits, whatever the memory."""
    prompt_encoder = PromptEncoder3D(embed_dim=384, image_embedding_size=(8, 8, 8), input_image_size=(128,) * 3,
                                     mask_in_chans=16)  # fmt: skip
    mask_decoder = MaskDecoder3D(
        num_multimask_outputs=3, transformer_dim=384, iou_head_depth=3, iou_head_hidden_dim=256
    )
    prompt_encoder.load_state_dict(model.prompt_encoder.state_dict())
    mask_decoder.load_state_dict(model.mask_decoder.state_dict())
    memory, prev = run_session(model, emb, steps=4)
    coords, labels = clicks(n=3, seed=9)
    labels[0, 2] = -1
    with torch.no_grad():
        sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=prev)
        expected, _ = mask_decoder(emb, prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
        with_mode(model, "none")
        try:
            out = model.predict(emb, coords, labels, prev, memory)
            out_no_prev = model.predict(emb, coords, labels, None, None)
        finally:
            with_mode(model, "both")
        sparse, dense = prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        expected_no_prev, _ = mask_decoder(emb, prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=False)
    assert torch.equal(out.low_res_logits, expected)
    assert torch.equal(out_no_prev.low_res_logits, expected_no_prev)
    assert out.attention is None and out.memory_entry.nbytes() == 0
    assert model.upsample_logits(out.low_res_logits).shape == (1, 1, 128, 128, 128)


def test_prompts_are_embedded_as_medim_embeds_them_in_training_precision_too(model):
    """embed_prompts (no boolean-mask writes, so no wait for the GPU) against medim's forward under bf16
    autocast, as training runs it: the same values and dtypes, with and without a previous mask."""
    coords, labels = clicks(batch_size=2, n=5, seed=3)
    labels[0, 3] = -1
    prev = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for masks in (prev, None):
            expected = model.prompt_encoder(points=(coords, labels), boxes=None, masks=masks)
            got = embed_prompts(model.prompt_encoder, coords, labels, masks)
            for e, g in zip(expected, got):
                assert e.dtype == g.dtype and torch.equal(e, g)


def test_untrained_memory_attention_adds_nothing(emb):
    """Fresh build: the zero-initialised output projection makes every mode start as SAM-Med3D."""
    torch.manual_seed(1)
    model = build_mais(MaisConfig.light(memory_mode="both"))
    memory, prev = run_session(model, emb, steps=3)
    coords, labels = clicks(seed=4)
    with torch.no_grad():
        with_mode(model, "both")
        both = model.predict(emb, coords, labels, prev, memory).low_res_logits
        with_mode(model, "none")
        none = model.predict(emb, coords, labels, prev, memory).low_res_logits
    assert torch.equal(both, none)


@pytest.mark.parametrize("mode", ["sparse", "dense", "both"])
def test_memory_changes_the_output_and_its_weights_depend_on_content(model, emb, mode):
    with_mode(model, mode)
    try:
        memory, prev = run_session(model, emb, steps=5)
        coords, labels = clicks(seed=11)
        with torch.no_grad():
            with_memory = model.predict(emb, coords, labels, prev, memory)
            empty = model.predict(emb, coords, labels, prev, model.new_memory())
            altered = model.new_memory()
            for kept in memory.entries[:4]:
                altered.push(kept)
            other = model.predict(emb, *clicks(seed=99), torch.randn_like(prev), model.new_memory())
            altered.push(other.memory_entry)  # same slots, except the newest one's content
            with_altered = model.predict(emb, coords, labels, prev, altered)
    finally:
        with_mode(model, "both")
    assert not torch.allclose(with_memory.low_res_logits, empty.low_res_logits)
    att, att_altered = with_memory.attention, with_altered.attention
    if mode in ("dense", "both"):
        assert att.dense.shape == (1, 512, 4, 6)  # [current, 5 slots newest first]
        assert (att.dense[..., 1:] > 0).all()
        assert torch.allclose(att.dense.sum(-1), torch.ones(1, 512, 4))
        assert not torch.allclose(att.dense[..., 1], att_altered.dense[..., 1])  # the changed slot
    if mode in ("sparse", "both"):
        # tokens: null, current (click + pad), then 5 slots x (click + pad)
        assert att.sparse_cross.shape == (1, 4, 512, 1 + 2 * 6)
        memory_clicks = att.sparse_cross[..., 3::2]
        assert (memory_clicks > 0).all() and (att.sparse_cross[..., 4::2] == 0).all()  # padding points ignored
        assert not torch.allclose(att.sparse_cross[..., 3], att_altered.sparse_cross[..., 3])
    if mode == "sparse":
        assert att.dense is None


def test_a_prediction_leaves_the_memory_as_it_was(model, emb):
    """Only the pushed entry changes what the memory contributes: predicting alone (a step not committed) does
    not, so a prediction can be recomputed or discarded."""
    memory, prev = run_session(model, emb, steps=3)
    coords, labels = clicks(seed=21)
    with torch.no_grad():
        before = model.predict(emb, coords, labels, prev, memory).low_res_logits
        discarded = model.predict(emb, *clicks(seed=22), prev, memory)
        after = model.predict(emb, coords, labels, prev, memory).low_res_logits
        memory.push(discarded.memory_entry)
        changed = model.predict(emb, coords, labels, prev, memory).low_res_logits
    assert torch.equal(before, after)
    assert not torch.equal(before, changed)


def test_fifo_memory_keeps_the_newest_n(emb):
    model = make_model(memory_size=3)
    memory, _ = run_session(model, emb, steps=5)
    assert len(memory) == 3
    expected, _ = run_session(model, emb, steps=5)
    reference = model.new_memory()
    for e in expected.entries:
        reference.push(e)
    for a, b in zip(memory.entries, reference.entries):
        assert torch.equal(a.dense_key, b.dense_key)


def test_batch_of_two_trains_through_ten_steps_of_memory():
    """The trainer's loop: B = 2, K = 10 steps, bank updated each step, one backward over all steps."""
    model = make_model(memory_size=60).train()
    emb = torch.randn(2, 384, 8, 8, 8)
    memory = model.new_memory(batch_size=2, dtype=torch.float32)
    prev, loss = None, 0.0
    for step in range(10):
        coords, labels = clicks(batch_size=2, n=2, seed=step)
        labels[1, 1] = -1  # the second sample has one click fewer
        out = model.predict(emb, coords, labels, prev, memory)
        memory.push(out.memory_entry)
        prev = out.low_res_logits
        loss = loss + prev.sigmoid().mean()  # low-res: the upsampling's backward would only cost time
    assert prev.shape == (2, 1, 32, 32, 32) and len(memory) == 10
    loss.backward()
    grads = {n: p.grad for n, p in model.memory_attention.named_parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items() if g is None]


def test_predict_checks_shapes(model, emb):
    with pytest.raises(ValueError, match="point_coords"):
        model.predict(emb, torch.zeros(1, 2, 3), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="memory bank holds batch size 2"):
        model.predict(emb, *clicks(), None, model.new_memory(batch_size=2))
    with torch.no_grad():
        out = model.predict(emb, torch.zeros(1, 0, 3), torch.zeros(1, 0, dtype=torch.long))  # mask-only step
    assert out.low_res_logits.shape == (1, 1, 32, 32, 32)


def test_the_positional_encoding_is_computed_again_when_its_buffer_changes():
    """`dense_pe` is kept between clicks; loading weights with another encoding (the buffer copied in place) must
    give that encoding, not the kept one, and a model used for inference must still train."""
    model = make_model()
    with torch.inference_mode():
        kept = model.dense_pe()
    torch.testing.assert_close(kept, model.prompt_encoder.get_dense_pe())
    other = make_model(seed=1).state_dict()
    model.load_state_dict(other)
    assert not torch.equal(model.dense_pe(), kept)
    torch.testing.assert_close(model.dense_pe(), model.prompt_encoder.get_dense_pe())
    emb = torch.randn(1, 384, 8, 8, 8)
    out = model.predict(emb, *clicks())
    out.low_res_logits.sum().backward()  # an inference tensor in the graph would refuse this
    assert model.mask_decoder.output_upscaling[0].weight.grad is not None
