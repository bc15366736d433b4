"""A light full-resolution head that moves the decoder's mask edges onto the image's (SAM-HQ's idea, in 3D).

SAM-Med3D decodes a 128^3 crop at 32^3 (6 mm cells at 1.5 mm) and upsamples the logits trilinearly, so an edge
can be no sharper than a cell and a structure a few cells wide is a blur. This head sees the crop's image, the
upsampled logits and the clicks and adds a residual to the logits:

    image [B, 1, S, S, S], logits [B, 1, S, S, S], clicks [B, P, 3] / [B, P]  ->  residual [B, 1, S, S, S]

    context   at half resolution: the image and the squashed logits, each 2^3 cell through a strided 2^3
              convolution (an edge inside a cell is not averaged away), and the click maps (positive,
              negative), through two 3^3 convolutions (15 mm around each voxel)
              -> coefficients a, b, c [B, 3, S/2, S/2, S/2]
    residual  at full resolution, per voxel: a * image + b * squashed logit + c, the coefficients upsampled

The residual is affine in the voxel's own intensity (a guided filter's idea), so the context says which intensity
is inside near here and the edge lands on the voxel where the image crosses it, at full resolution. The
coefficient layer starts at zero, so an untrained head leaves the decoder's mask exactly as it was; a model
without the head (MaisConfig.refinement False) is SAM-Med3D's network. Everything but the last line runs at half
resolution: ~0.5 GMAC and a few full-resolution passes, ~60 ms a click on two CPU cores (bench_session.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# logits are squashed to (-1, 1) on this scale before the head reads them: what matters is the sign and how sure
LOGIT_SCALE = 4.0
# the residual's coefficients: a (image), b (squashed logit), c (constant)
COEFFICIENTS = 3
CELL_CHANNELS = 6


class MaskRefinement(nn.Module):
    """The head of the module docstring, with `channels` feature channels at half resolution."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        # cells to 6 channels, so that with the 2 click maps the context convolution reads 8: oneDNN's 3D
        # convolution is ten times slower on the CPU with a count it does not vectorise (4 or 5)
        self.cells = nn.Conv3d(2, CELL_CHANNELS, kernel_size=2, stride=2)
        self.context = nn.Sequential(
            nn.Conv3d(CELL_CHANNELS + 2, channels, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv3d(channels, channels, kernel_size=3, padding=2, dilation=2),
            nn.GELU(),
        )
        self.coefficients = nn.Conv3d(channels, COEFFICIENTS, kernel_size=1)
        nn.init.zeros_(self.coefficients.weight)
        nn.init.zeros_(self.coefficients.bias)

    def forward(self, image: Tensor, logits: Tensor, point_coords: Tensor, point_labels: Tensor) -> Tensor:
        """image [B, 1, S, S, S] (normalised as the encoder's input), logits [B, 1, S, S, S] (the decoder's,
        upsampled), point_coords [B, P, 3] (d0, d1, d2) voxels of the crop, point_labels [B, P] (1 positive,
        0 negative, -1 padding) -> residual logits [B, 1, S, S, S]."""
        squashed = torch.tanh(logits / LOGIT_SCALE)
        half = self.cells(torch.cat([image, squashed], dim=1))
        clicks = click_maps(point_coords, point_labels, half.shape[-1], image.shape[-1]).to(half.dtype)
        coefficients = self.coefficients(self.context(torch.cat([half, clicks], dim=1)))
        a, b, c = F.interpolate(coefficients, size=image.shape[-3:], mode="nearest").unbind(1)
        return (a * image[:, 0] + b * squashed[:, 0] + c)[:, None]


# the 3^3 block a click draws: offsets (-1, 0, 1) along each axis
_BLOCK = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)


def click_blocks(centres: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """The 3^3 block of voxels around each integer voxel of `centres` [B, P, 3] on a size^3 grid: the blocks'
    flat indices [B, P, 27] (a voxel beyond the grid clamped onto its edge) and whether each lies inside the
    grid [B, P, 27] bool."""
    cells = centres[:, :, None] + _BLOCK.to(centres.device)  # [B, P, 27, 3]
    inside = ((cells >= 0) & (cells < size)).all(-1)
    cells = cells.clamp(0, size - 1)
    return (cells[..., 0] * size + cells[..., 1]) * size + cells[..., 2], inside


def click_maps(point_coords: Tensor, point_labels: Tensor, size: int, crop_size: int) -> Tensor:
    """Positive and negative clicks as 3^3 blocks of ones on a size^3 grid covering the crop_size^3 crop:
    [B, P, 3] voxels / [B, P] labels -> [B, 2, size, size, size] float (channel 0 positive, 1 negative).
    Padding clicks (label -1) draw nothing; no host synchronisation (scatter, not boolean indexing)."""
    B, P = point_labels.shape
    maps = torch.zeros(B, 2 * size**3, device=point_coords.device)
    if P:
        centres = (point_coords.float() * (size / crop_size)).long().clamp(0, size - 1)  # [B, P, 3]
        flat, inside = click_blocks(centres, size)
        channel = (point_labels == 0).long()[:, :, None]  # 0 positive, 1 negative
        drawn = ((point_labels >= 0)[:, :, None] & inside).float()
        maps.scatter_reduce_(1, (channel * size**3 + flat).flatten(1), drawn.flatten(1), reduce="amax")
    return maps.view(B, 2, size, size, size)
