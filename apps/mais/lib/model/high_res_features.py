"""High-resolution image features for the mask decoder's upscaling (SAM 2's idea, in 3D).

The encoder sees a 128^3 crop through 16^3 patches: everything the decoder knows about the image is one token
per 16^3 voxels, and its output upscaling (8^3 -> 16^3 -> 32^3, two transposed convolutions) adds no image
detail. So an edge inside a patch can only be drawn where the token's features happen to say it is, and a
structure a few voxels across is hard to draw at all. Measured on 12 of the generalist training's own samples
(session 9, `benchmarks/training_fit.py --oracle-every 4`): after 10 clicks run 17 reaches Dice 0.73 where the best
32^3 logits reach 0.95, and it is furthest behind on the small targets.

This module gives the decoder the image at its own scales. A small convolutional stem reads the crop's voxels
directly:

    volume [B, 1, 128, 128, 128] -> stride 4: [B, 48, 32, 32, 32], stride 8: [B, 96, 16, 16, 16]

and the decoder's upscaling adds them before its activations, as SAM 2's mask decoder adds its encoder's stride-4
and stride-8 maps (`decode_with_high_res`):

    upscaled = GELU(LayerNorm(ConvT1(src) + stride_8))     [B, 96, 16^3]
    upscaled = GELU(ConvT2(upscaled) + stride_4)           [B, 48, 32^3]

The two projections onto the decoder's channels start at zero, so a model given fresh features computes exactly
what it did without them; a model without them (MaisConfig.high_res_features False) is SAM-Med3D's network.
The stem is 44 k parameters; its features depend on the crop alone, so a window computes them once, beside its
image embedding (lib.model.interaction.InteractionState).
"""

from __future__ import annotations

import torch
from medim.models.sam_med3d import LayerNorm3d, MaskDecoder3D
from torch import Tensor, nn

# The decoder's upscaling channels at 16^3 and 32^3 (medim's MaskDecoder3D: transformer_dim / 4 and / 8)
STRIDE_8_CHANNELS = 96
STRIDE_4_CHANNELS = 48

HighResFeatureMaps = tuple[Tensor, Tensor]  # (stride 8 [B, 96, 16, 16, 16], stride 4 [B, 48, 32, 32, 32])


class HighResFeatures(nn.Module):
    """The stem of the module docstring: `channels` features at stride 4, twice as many at stride 8."""

    def __init__(self, channels: int = 16) -> None:
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
        for projection in (self.project_4, self.project_8):
            nn.init.zeros_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, volume: Tensor) -> HighResFeatureMaps:
        """volume [B, 1, S, S, S] (normalised as the encoder's input) -> (stride 8 [B, 96, S/8, S/8, S/8],
        stride 4 [B, 48, S/4, S/4, S/4]) in the decoder's channels."""
        fine = self.stride_4(volume)
        return self.project_8(self.stride_8(fine)), self.project_4(fine)


def decode_with_high_res(
    decoder: MaskDecoder3D,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    high_res: HighResFeatureMaps,
) -> Tensor:
    """The decoder's single mask [B, 1, 32, 32, 32], as medim's `MaskDecoder3D.forward(..., multimask_output=
    False)` computes it but with `high_res` added in its upscaling (module docstring). image_embeddings and dense
    [B, E, 8, 8, 8], image_pe [1, E, 8, 8, 8], sparse [B, P, E]."""
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
    weights = decoder.output_hypernetworks_mlps[0](mask_token)  # [B, 48]
    b, c, x, y, z = upscaled.shape
    return (weights[:, None] @ upscaled.view(b, c, x * y * z)).view(b, 1, x, y, z)
