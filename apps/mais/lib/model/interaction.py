"""One interaction step, the unit that the server's session, the training loop, validation and the evaluation
all run (the evaluation through the session, validation through the training loop):

    1. prompt = the clicks the prompt encoder gets: every click so far, or only the newest one when the model's
       config.prompt_clicks is "latest" (`prompt_points`)
    2. out = model.predict(image_embeddings, prompt, state.low_res_logits, state.memory, state.high_res)
    3. state.memory.push(out.memory_entry)        one memory entry per step, pushed once the step is done
    4. state.low_res_logits = out.low_res_logits  fed back as the previous mask of the next step (detached: at
                                                  inference it is a given input, and in training it keeps each
                                                  step's decoder graph on its own)
    5. logits = model.mask_logits(...)            the step's full-resolution mask logits: the decoder's
                                                  upsampled, refined when the model has the refinement head

`InteractionState` is what one interaction carries from step to step; it holds no clicks, because who owns the
clicks differs: the training loop keeps every simulated click of a crop (`concat_points`), while a server session
gives each of its crop windows the user's clicks that fall inside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .high_res_features import HighResFeatureMaps
from .mais import Mais
from .memory_attention import MemoryAttentionWeights
from .memory_bank import MemoryBank


@dataclass
class StepOutput:
    """What one interaction step returns. low_res_logits [B, 1, 32, 32, 32]: the decoder's (with the graph, for
    a loss; the state keeps a detached copy). logits [B, 1, 128, 128, 128]: the step's mask logits (mask =
    logits > 0). attention: the memory attention's weights (None in memory mode "none")."""

    low_res_logits: Tensor
    logits: Tensor
    attention: MemoryAttentionWeights | None


@dataclass
class InteractionState:
    """memory: the bank of the earlier steps (batch size B). low_res_logits [B, 1, 32, 32, 32]: the previous step's
    mask logits, None before the first step (a caller may seed it, e.g. with what neighbouring windows found).
    high_res: the crops' part of the high-resolution features for a model with them (`Mais.high_res_features`:
    the features, or the cells each step finishes with its prompt), computed once when the interaction starts (in
    training with their graph, which every step's loss then trains)."""

    memory: MemoryBank
    low_res_logits: Tensor | None = None
    high_res: HighResFeatureMaps | Tensor | None = None

    @classmethod
    def start(cls, model: Mais, batch_size: int = 1, volume: Tensor | None = None) -> InteractionState:
        """An interaction before its first step: empty memory, no previous mask. volume [B, 1, 128, 128, 128]:
        the crops, needed (only) by a model with high-resolution features."""
        if model.config.high_res_features and volume is None:
            raise ValueError("a model with high-resolution features starts an interaction from the crops' volume")
        return cls(model.new_memory(batch_size=batch_size), high_res=model.high_res_features(volume))

    def step(
        self,
        model: Mais,
        image_embeddings: Tensor,
        volume: Tensor | None,
        click_coords: Tensor,
        click_labels: Tensor,
        refine: bool = True,
    ) -> StepOutput:
        """One interaction step (module docstring).

        image_embeddings [B, E, 8, 8, 8] from `model.embed_image`; volume [B, 1, 128, 128, 128]: the crops they
        embed (what the refinement head sees; unused, and may be None, without it). click_coords [B, N, 3] float
        (d0, d1, d2) crop voxels and click_labels [B, N] int (1 positive, 0 negative, -1 padding): the clicks of
        this interaction so far, oldest first, the newest last. refine False: the logits are the decoder's
        upsampled, the refinement head skipped (training runs it at one step of a sequence: see
        lib.training.interaction_loop).
        Gradients flow as the caller's mode allows (training: through the prediction and the memory entries;
        inference: call under torch.inference_mode()).
        """
        point_coords, point_labels = prompt_points(click_coords, click_labels, model.config.prompt_clicks)
        output = model.predict(
            image_embeddings, point_coords, point_labels, self.low_res_logits, self.memory, self.high_res
        )
        self.memory.push(output.memory_entry)
        self.low_res_logits = output.low_res_logits.detach()
        if refine:
            logits = model.mask_logits(output.low_res_logits, volume, point_coords, point_labels)
        else:
            logits = model.upsample_logits(output.low_res_logits)
        return StepOutput(output.low_res_logits, logits, output.attention)


def prompt_points(click_coords: Tensor, click_labels: Tensor, prompt_clicks: str) -> tuple[Tensor, Tensor]:
    """The clicks [B, N, 3] / [B, N] (oldest first) the prompt encoder gets: all of them for "all", the newest
    ([B, 1, 3] / [B, 1]) for "latest" (SAM-Med3D's protocol: earlier clicks reach the model through its memory
    and previous mask only)."""
    if prompt_clicks == "all":
        return click_coords, click_labels
    if prompt_clicks == "latest":
        return click_coords[:, -1:], click_labels[:, -1:]
    raise ValueError(f"unknown prompt_clicks {prompt_clicks!r}; expected 'all' or 'latest'")


def concat_points(
    click_coords: Tensor | None, click_labels: Tensor | None, new_coords: Tensor, new_labels: Tensor
) -> tuple[Tensor, Tensor]:
    """The clicks so far ([B, N, 3] / [B, N], or None before the first) with the new ones [B, M, 3] / [B, M]
    appended -> [B, N + M, 3] / [B, N + M] (as SAM 2's `concat_points`)."""
    if click_coords is None:
        return new_coords, new_labels
    return torch.cat([click_coords, new_coords], dim=1), torch.cat([click_labels, new_labels], dim=1)
