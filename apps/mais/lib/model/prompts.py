"""SAM-Med3D's prompt embedding (medim's `PromptEncoder3D`) computed without making the host wait for the GPU.

medim's `PromptEncoder3D.forward` writes each point's label embedding through boolean masks
(`embedding[labels == -1] = ...`, four of them); a boolean-mask write needs the mask's indices on the host, so
each one waits for every kernel queued before it: four waits a click, in each of a training step's K clicks and
in every served click. `embed_prompts` takes the same weights from the same module and selects with
`torch.where`, which gives the same values (tests/test_model_mais.py compares them with medim's forward bit for
bit) and queues like any other kernel.
"""

from __future__ import annotations

import torch
from medim.models.sam_med3d import PromptEncoder3D
from torch import Tensor

NOT_A_POINT = -1  # the label of a padding point


def embed_prompts(
    encoder: PromptEncoder3D, point_coords: Tensor, point_labels: Tensor, masks: Tensor | None
) -> tuple[Tensor, Tensor]:
    """What `encoder(points=(point_coords, point_labels), boxes=None, masks=masks)` returns: sparse
    [B, P + 1, C] (one padding point appended, as SAM does without a box) and dense [B, C, 8, 8, 8].

    point_coords float [B, P, 3] crop voxels; point_labels [B, P]: 1 positive, 0 negative, -1 padding; masks
    [B, 1, 32, 32, 32] the previous low-res logits, or None."""
    B = point_coords.shape[0]
    coords = torch.cat([point_coords + 0.5, point_coords.new_zeros(B, 1, 3)], dim=1)  # voxel centres; the padding
    labels = torch.cat([point_labels, point_labels.new_full((B, 1), NOT_A_POINT)], dim=1)[..., None]
    embedding = encoder.pe_layer.forward_with_coords(coords, encoder.input_image_size)  # [B, P + 1, C]
    # each label's embedding added in the positional encoding's dtype, as medim's in-place writes do
    embedding = torch.where(labels == NOT_A_POINT, encoder.not_a_point_embed.weight.to(embedding.dtype), embedding)
    for label, label_embedding in enumerate(encoder.point_embeddings):  # 0 negative, 1 positive
        embedding = torch.where(labels == label, (embedding + label_embedding.weight).to(embedding.dtype), embedding)
    if masks is None:
        dense = encoder.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(B, -1, *encoder.image_embedding_size)
    else:
        dense = encoder.mask_downscaling(masks)
    # medim concatenates the points onto an empty float32 tensor, which makes them float32 under autocast too
    return embedding.float(), dense
