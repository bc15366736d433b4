"""Build a MAIS network from its configuration (lib.model.config), with random weights.

    model = build_mais(MaisConfig.light())   # eval-mode Mais (lib.model.mais)

Trained weights come from a MAIS weights file (lib.model.weights.load_mais) or an official SAM-Med3D checkpoint
(lib.model.import_sam_med3d.load_sam_med3d_checkpoint).
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from medim.models.sam_med3d import MaskDecoder3D, PromptEncoder3D
from torch import nn

from .config import MaisConfig
from .high_res_features import HighResFeatures
from .image_encoder import ImageEncoder3D
from .mais import Mais
from .memory_attention import MemoryAttention
from .refinement import MaskRefinement

# SAM-Med3D's prompt embedding width; medim's MaskDecoder3D fixes its transformer around it (8 heads, MLP 2048)
PROMPT_EMBED_DIM = 384


def build_mais(config: MaisConfig, device: torch.device | str | None = None) -> Mais:
    """A Mais model in eval mode with random weights (memory attention's output projection, the refinement
    head's last layer and the high-resolution features' projections zero: see memory_attention.py, refinement.py
    and high_res_features.py). device "meta" builds shapes only (no
    memory, instant)."""
    enc = config.encoder
    grid = enc.img_size // enc.patch_size
    with torch.device(device) if device is not None else contextlib.nullcontext():
        image_encoder = ImageEncoder3D(
            img_size=enc.img_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=PROMPT_EMBED_DIM,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            window_size=enc.window_size,
            global_attn_indexes=enc.global_attn_indexes,
            neck_kernel_size=enc.neck_kernel_size,
        )
        # exactly medim's build_sam3D_vit_b_ori prompt encoder and decoder
        prompt_encoder = PromptEncoder3D(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid, grid),
            input_image_size=(enc.img_size,) * 3,
            mask_in_chans=16,
        )
        mask_decoder = MaskDecoder3D(
            num_multimask_outputs=3, transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256
        )
        memory_attention = MemoryAttention(PROMPT_EMBED_DIM, config.memory_size, config.memory_attention)
        refinement = MaskRefinement() if config.refinement else None
        high_res = (
            HighResFeatures(prompts=config.high_res_prompts, context=config.high_res_context)
            if config.high_res_features
            else None
        )
    return Mais(image_encoder, prompt_encoder, mask_decoder, memory_attention, config, refinement, high_res).eval()
