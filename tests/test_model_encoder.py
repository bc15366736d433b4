"""lib.model.image_encoder: the fast path equals medim's encoder (max abs diff <= 1e-4, fp32, random weights)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from lib.model.builder import build_mais
from lib.model.config import MaisConfig
from lib.model.image_encoder import ImageEncoder3D


def randomise(encoder: ImageEncoder3D, seed: int = 0) -> ImageEncoder3D:
    """medim zero-initialises relative positions and the position embedding: make them (and biases) count."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "rel_pos" in name or "pos_embed" in name or name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "rel_pos" in name else 0.1))
    return encoder.eval()


def small_encoder(window_size: int, global_attn_indexes: tuple[int, ...]) -> ImageEncoder3D:
    return ImageEncoder3D(
        img_size=128, patch_size=16, embed_dim=96, depth=2, num_heads=2, out_chans=384, qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=window_size,
        global_attn_indexes=global_attn_indexes,
    )  # fmt: skip


@pytest.mark.parametrize("window_size, global_attn_indexes", [(14, (1,)), (0, ())])
def test_fast_path_equals_medim_small_batch_of_two(window_size, global_attn_indexes):
    encoder = randomise(small_encoder(window_size, global_attn_indexes))
    volume = torch.randn(2, 1, 128, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fast, reference = encoder(volume), encoder.forward_reference(volume)
    assert fast.shape == reference.shape == (2, 384, 8, 8, 8)
    assert (fast - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("config", [MaisConfig.sam_med3d(), MaisConfig.light()], ids=lambda c: c.name)
def test_fast_path_equals_medim_full_configs(config):
    encoder = randomise(build_mais(config).image_encoder)
    volume = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast, reference = encoder(volume), encoder.forward_reference(volume)
    assert fast.shape == (1, 384, 8, 8, 8)
    assert (fast - reference).abs().max().item() <= 1e-4


def test_fast_path_gradients_match_medim():
    """The trainer may fine-tune the encoder: the fast path must be differentiable like medim's."""
    encoder = randomise(small_encoder(14, (1,))).train()
    volume = torch.randn(1, 1, 128, 128, 128, generator=torch.Generator().manual_seed(3))
    grads = []
    for forward in (encoder.forward, encoder.forward_reference):
        encoder.zero_grad()
        forward(volume).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in encoder.named_parameters()})
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-5, rtol=1e-3), name
