"""High-resolution image features for the mask decoder's upscaling (SAM 2's idea, in 3D), optionally with the
prompts drawn in at the same resolution (nnInteractive's idea: clicks and the previous mask as input channels).

The encoder sees a 128^3 crop through 16^3 patches: everything the decoder knows about the image is one token
per 16^3 voxels, and its output upscaling (8^3 -> 16^3 -> 32^3, two transposed convolutions) adds no image
detail. So an edge inside a patch can only be drawn where the token's features happen to say it is, and a
structure a few voxels across is hard to draw at all. Measured on 12 of the generalist training's own samples
(session 9, `benchmarks/training_fit.py --oracle-every 4`): after 10 clicks run 17 reaches Dice 0.73 where the best
32^3 logits reach 0.95, and it is furthest behind on the small targets.

This module gives the decoder the image at its own scales. A small convolutional stem reads the crop's voxels
directly (`image_cells`, then `forward`):

    volume [B, 1, 128, 128, 128] -> cells [B, 16, 32, 32, 32] -> stride 4: [B, 48, 32^3], stride 8: [B, 96, 16^3]

Without prompts the features depend on the crop alone, so a window computes them once, beside its image
embedding (lib.model.interaction.InteractionState keeps them); with prompts it keeps the cells, and each step
finishes them with its own prompt (`Mais.predict`).

and the decoder's upscaling adds them before its activations, as SAM 2's mask decoder adds its encoder's stride-4
and stride-8 maps (`decode_with_high_res`):

    upscaled = GELU(LayerNorm(ConvT1(src) + stride_8))     [B, 96, 16^3]
    upscaled = GELU(ConvT2(upscaled) + stride_4)           [B, 48, 32^3]

With prompts (MaisConfig.high_res_prompts), the step's clicks and previous mask reach the cells at 32^3 (3 mm at
0.75 mm voxels) too: `prompt_maps` draws the positive and the negative clicks (3^3 blocks) and the previous low-res
logits (squashed) as three channels, and a two-layer branch adds its features to the image's. Without them a click
reaches the upscaling only through the decoder's tokens, one per 12 mm: run 17, which obeys 95 % of its clicks,
still corrects a fixed few voxels around each (benchmarks/results/generalist/README.md, session 9), where a
correction should run to the image's edge near the click.

With context (MaisConfig.high_res_context), a residual block of three 3^3 convolutions (dilations 1, 2, 4; 15
cells across, 45 mm at 0.75 mm voxels) reads the upscaled features once the image's and the prompts' are in, before
the mask token's dot product (`UpscaledContext`):

    upscaled = upscaled + Conv_4(GELU(Conv_2(GELU(Conv_1(LayerNorm(upscaled))))))    [B, 48, 32^3]

Without it nothing after the prompt branch mixes neighbouring cells at 32^3: the mask is a per-cell dot product,
so a click's block changes the cells it covers and reaches further only through the 16^3 map and the decoder's
12 mm tokens, and a correction cannot follow an edge of the image away from the click. With it a step's
prompt, the previous mask and the image detail meet over a neighbourhood at the decoder's finest grid
(nnInteractive decodes clicks with convolutions at full resolution for this reason).

The two projections onto the decoder's channels, the prompt branch's last layer and the context's last
convolution start at zero, so a model given fresh features (or a fresh prompt branch, or fresh context) computes
exactly what it did without them; a model without them (MaisConfig.high_res_features False) is SAM-Med3D's
network. The stem is 44 k parameters, the prompt branch 1.6 k, the context 111 k (24-33 ms a pass on two CPU
cores alone; a later click on the sample CT over HTTP 84 -> 126 ms, benchmarks/results/generalist/README.md,
session 13).
"""

from __future__ import annotations

import torch
from medim.models.sam_med3d import LayerNorm3d, MaskDecoder3D
from torch import Tensor, nn

from .refinement import LOGIT_SCALE, click_maps

# The decoder's upscaling channels at 16^3 and 32^3 (medim's MaskDecoder3D: transformer_dim / 4 and / 8)
STRIDE_8_CHANNELS = 96
STRIDE_4_CHANNELS = 48
# what `prompt_maps` draws: positive clicks, negative clicks, the previous mask
PROMPT_CHANNELS = 3
# the context block's width: 32 (or 24) runs at 21-24 ms a click on two CPU cores where 16 takes 85 (oneDNN's
# 3D convolution does not vectorise that count for these shapes) and 48 takes 39
CONTEXT_CHANNELS = 32

HighResFeatureMaps = tuple[Tensor, Tensor]  # (stride 8 [B, 96, 16, 16, 16], stride 4 [B, 48, 32, 32, 32])


class UpscaledContext(nn.Module):
    """The residual block of the module docstring on the decoder's upscaled features [B, 48, S, S, S]; its last
    convolution starts at zero (the block then passes its input through unchanged)."""

    def __init__(self, channels: int = CONTEXT_CHANNELS) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            LayerNorm3d(STRIDE_4_CHANNELS),
            nn.Conv3d(STRIDE_4_CHANNELS, channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv3d(channels, STRIDE_4_CHANNELS, kernel_size=3, padding=4, dilation=4),
        )
        nn.init.zeros_(self.residual[-1].weight)
        nn.init.zeros_(self.residual[-1].bias)

    def forward(self, upscaled: Tensor) -> Tensor:
        return upscaled + self.residual(upscaled)


class HighResFeatures(nn.Module):
    """The stem of the module docstring: `channels` features at stride 4, twice as many at stride 8; with
    `prompts`, the branch that adds the prompt maps to the stride-4 cells; with `context`, the decoder's
    `UpscaledContext` (kept here, beside the features it mixes; `decode_with_high_res` applies it)."""

    def __init__(self, channels: int = 16, prompts: bool = False, context: bool = False) -> None:
        super().__init__()
        # each convolution normalised per voxel, as the decoder's upscaling is: without, one batch of the first
        # GPU run (run 20, session 9) drove the logits so far that its loss rose from 9 to 2705 for a step
        self.stride_4 = nn.Sequential(
            # stride 4 by a 4^3 convolution of stride 4: each cell reads its own 64 voxels, none averaged away
            nn.Conv3d(1, channels, kernel_size=4, stride=4),
            LayerNorm3d(channels),
            nn.GELU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=1),
            LayerNorm3d(channels),
            nn.GELU(),
        )
        self.stride_8 = nn.Sequential(
            nn.Conv3d(channels, 2 * channels, kernel_size=2, stride=2),
            LayerNorm3d(2 * channels),
            nn.GELU(),
            nn.Conv3d(2 * channels, 2 * channels, kernel_size=3, padding=1),
            LayerNorm3d(2 * channels),
            nn.GELU(),
        )
        self.project_4 = nn.Conv3d(channels, STRIDE_4_CHANNELS, kernel_size=1)
        self.project_8 = nn.Conv3d(2 * channels, STRIDE_8_CHANNELS, kernel_size=1)
        starts_at_zero = [self.project_4, self.project_8]
        self.prompt_4: nn.Sequential | None = None
        if prompts:
            # 3^3 at 32^3 then per cell: a click's block and the mask's edge, seen beside the image's cells
            self.prompt_4 = nn.Sequential(
                nn.Conv3d(PROMPT_CHANNELS, channels, kernel_size=3, padding=1),
                LayerNorm3d(channels),
                nn.GELU(),
                nn.Conv3d(channels, channels, kernel_size=1),
            )
            starts_at_zero.append(self.prompt_4[-1])
        for layer in starts_at_zero:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.context = UpscaledContext() if context else None

    def image_cells(self, volume: Tensor) -> Tensor:
        """volume [B, 1, S, S, S] (normalised as the encoder's input) -> cells [B, channels, S/4, S/4, S/4]: the
        part that depends on the crop alone."""
        return self.stride_4(volume)

    def forward(self, cells: Tensor, prompt: Tensor | None = None) -> HighResFeatureMaps:
        """cells [B, channels, S/4, S/4, S/4] from `image_cells`; prompt [B, 3, S/4, S/4, S/4] from `prompt_maps`
        for (and only for) a stem with prompts -> (stride 8 [B, 96, S/8, S/8, S/8], stride 4 [B, 48, S/4, S/4,
        S/4]) in the decoder's channels."""
        if (prompt is not None) != (self.prompt_4 is not None):
            raise ValueError(f"prompt maps are for a stem with prompts (this one: {self.prompt_4 is not None})")
        if self.prompt_4 is not None:
            cells = cells + self.prompt_4(prompt)
        return self.project_8(self.stride_8(cells)), self.project_4(cells)


def prompt_maps(
    point_coords: Tensor, point_labels: Tensor, prev_low_res_logits: Tensor | None, size: int, crop_size: int
) -> Tensor:
    """The step's prompt at size^3 over the crop_size^3 crop: positive and negative clicks as 3^3 blocks of ones
    (lib.model.refinement.click_maps; padding clicks draw nothing) and the previous low-res logits [B, 1, size^3]
    (the decoder's grid) squashed to (-1, 1), zero before the first step -> [B, 3, size, size, size]."""
    clicks = click_maps(point_coords, point_labels, size, crop_size)
    if prev_low_res_logits is None:
        previous = clicks.new_zeros(clicks.shape[0], 1, size, size, size)
    else:
        previous = torch.tanh(prev_low_res_logits.float() / LOGIT_SCALE).to(clicks.dtype)
    return torch.cat([clicks, previous], dim=1)


def decode_with_high_res(
    decoder: MaskDecoder3D,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    high_res: HighResFeatureMaps,
    context: UpscaledContext | None = None,
) -> Tensor:
    """The decoder's single mask [B, 1, 32, 32, 32], as medim's `MaskDecoder3D.forward(..., multimask_output=
    False)` computes it but with `high_res` added in its upscaling and, given one, the `context` block after it
    (module docstring). image_embeddings and dense [B, E, 8, 8, 8], image_pe [1, E, 8, 8, 8], sparse [B, P, E]."""
    B = sparse.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens[None].expand(B, -1, -1), sparse], dim=1)
    src = image_embeddings + dense
    pos_src = image_pe if image_pe.shape[0] == B else torch.repeat_interleave(image_pe, B, dim=0)
    b, c, x, y, z = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    mask_token = hs[:, 1, :]  # the single-mask output's token (the first after the IoU token)
    src = src.transpose(1, 2).view(b, c, x, y, z)
    up_8, norm, act_8, up_4, act_4 = decoder.output_upscaling
    stride_8, stride_4 = high_res
    upscaled = act_4(up_4(act_8(norm(up_8(src) + stride_8))) + stride_4)  # [B, 48, 32, 32, 32]
    if context is not None:
        upscaled = context(upscaled)
    weights = decoder.output_hypernetworks_mlps[0](mask_token)  # [B, 48]
    b, c, x, y, z = upscaled.shape
    return (weights[:, None] @ upscaled.view(b, c, x * y * z)).view(b, 1, x, y, z)
