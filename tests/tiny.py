"""A tiny MAIS model and a tiny image for the tests that run without a server (seconds, CPU)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from lib.imaging import MODEL_SPACING_MM, ModelSpaceImage
from lib.model.builder import build_mais
from lib.model.config import EncoderConfig, MaisConfig
from lib.training.interaction_loop import InteractionConfig, InteractionResult, run_interaction

# A 30^3 image of 4 mm voxels; `box_image` sees it at 1.5 mm, 80^3 voxels: one crop window holds all of it, so no
# click opens a second window and a session runs one step per click. (At the 0.75 mm the server would choose it is
# 160^3, more than a window.)
IMAGE_SHAPE = (30, 30, 30)
OBJECT = (slice(10, 20), slice(12, 22), slice(8, 18))  # a bright box, the structure to segment
INSIDE = (15, 17, 13)  # a voxel of it


def tiny_model(
    prompt_clicks: str = "all",
    refinement: bool = False,
    high_res_features: bool = False,
    high_res_prompts: bool = False,
    high_res_context: bool = False,
) -> torch.nn.Module:
    """A one-block encoder on the real 128^3 crops (the session's windows are 128^3); seeded random weights."""
    torch.manual_seed(0)
    encoder = EncoderConfig(embed_dim=32, depth=1, num_heads=2, window_size=0, neck_kernel_size=1)
    config = MaisConfig(
        name="tiny",
        encoder=encoder,
        memory_size=8,
        prompt_clicks=prompt_clicks,
        refinement=refinement,
        high_res_features=high_res_features,
        high_res_prompts=high_res_prompts,
        high_res_context=high_res_context,
    )
    return build_mais(config)


def write_box_image(path: Path) -> Path:
    """The image: noise with the bright OBJECT box, 4 mm voxels, as NIfTI."""
    volume = np.random.default_rng(0).normal(100.0, 10.0, IMAGE_SHAPE).astype(np.float32)
    volume[OBJECT] += 200.0
    nib.save(nib.Nifti1Image(volume, np.diag([4.0, 4.0, 4.0, 1.0])), path)
    return path


def box_image(path: Path) -> ModelSpaceImage:
    """The image written to `path`, in a model space of 1.5 mm voxels (the module's comment says why)."""
    return ModelSpaceImage.from_file(str(write_box_image(path)), spacing_mm=MODEL_SPACING_MM)


def box_truth() -> np.ndarray:
    mask = np.zeros(IMAGE_SHAPE, dtype=bool)
    mask[OBJECT] = True
    return mask


def interaction_on_noise(model: torch.nn.Module, clicks: int = 3) -> InteractionResult:
    """`run_interaction` of `clicks` steps on two noise crops with a box each as their target (gradients as the
    caller's mode allows)."""
    images = torch.randn(2, 1, 128, 128, 128)
    masks = torch.zeros((2, 1, 128, 128, 128), dtype=torch.bool)
    masks[:, :, 40:70, 50:80, 30:60] = True
    config = InteractionConfig(num_clicks=clicks)
    return run_interaction(model, model.embed_image(images), images, masks, np.random.default_rng(0), config)
