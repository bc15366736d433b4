"""One training run's settings: `FitConfig`, a pydantic schema that is also the command line
(`python -m lib.training.fit`, every field a flag generated from it by lib.training.fit)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lib.model.config import MemoryMode, NetworkName, PromptClicks


class FitConfig(BaseModel):
    """One training run. Each field's description is its command-line help; a boolean field is a pair of flags,
    `--name` and `--no-name` (or the `negative_flag` its schema names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    out: Path = Field(Path("mais_weights.pt"), description="weights file to write (save_mais)")
    encoder: NetworkName = Field(
        "light", description="network trained from scratch (ignored with --init, which brings its own)"
    )
    memory_mode: MemoryMode = Field("both", description="memory of the trained model")
    memory_size: int = Field(60, ge=1, description="memory FIFO capacity N")
    prompt_clicks: PromptClicks = Field(
        "all",
        description="clicks the prompt encoder gets each step: all so far, or the latest only (SAM-Med3D's training)",
    )
    init: Path | None = Field(
        None,
        description="start from these MAIS weights (e.g. stage 1's): their network, this run's memory mode and size",
    )
    refinement: bool | None = Field(
        None,
        description="with (--refinement) or without (--no-refinement) the full-resolution refinement head; unset: "
        "the --init file's, or the --encoder network's default; a head the init file lacks starts at zero",
    )
    high_res_features: bool | None = Field(
        None,
        description="with (--high-res-features) or without (--no-high-res-features) the decoder's high-resolution "
        "image features; unset: the --init file's, or the --encoder network's default; features the init file "
        "lacks start at zero",
    )
    high_res_prompts: bool | None = Field(
        None,
        description="with (--high-res-prompts) or without (--no-high-res-prompts) the step's clicks and previous "
        "mask drawn into the high-resolution features (needs them); unset: the --init file's, or off; a prompt "
        "branch the init file lacks starts at zero",
    )
    high_res_context: bool | None = Field(
        None,
        description="with (--high-res-context) or without (--no-high-res-context) the residual convolution block on "
        "the decoder's 32^3 features (needs the high-resolution features); unset: the --init file's, or off; a "
        "block the init file lacks starts at zero",
    )
    fresh_memory: bool = Field(
        False, description="with --init: memory attention starts afresh, not from the file (equal start to compare)"
    )
    resume: Path | None = Field(None, description="continue from a training state <out>.state.pt")
    steps: int = Field(1000, ge=1, description="total optimiser steps of the run")
    batch_size: int = Field(2, ge=1, description="samples per step (per GPU with --gpus)")
    lr: float = Field(1e-4, gt=0, description="peak learning rate")
    memory_lr_scale: float = Field(
        1.0, gt=0, description="the memory attention's learning rate is lr x this (it starts from zero, the rest not)"
    )
    high_res_lr_scale: float = Field(
        1.0,
        gt=0,
        description="the high-resolution image features' learning rate is lr x this (their projections start from "
        "zero, the rest not)",
    )
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps (at most a tenth of the run)")
    max_grad_norm: float = Field(1.0, gt=0, description="clip gradients to this norm (ten summed losses can spike)")
    clicks: int = Field(10, ge=1, description="interaction steps K per sample")
    ce_weight: float = Field(0.0, ge=0, description="add BCE with this weight to the Dice loss")
    click_loss_weight: float = Field(
        0.0, ge=0, description="add the BCE at the 3^3 voxels around each click so far with this weight"
    )
    click_mix: Literal["random", "mixed"] = Field(
        "random",
        description="training clicks: uniform error voxels (SAM-Med3D's), or per step one of those, the deepest "
        "error voxel and a noisy deepest click (lib.training.interaction_loop.MIXED_TRAINING_CLICKS)",
    )
    freeze_encoder: bool = Field(
        True,
        description="train prompt encoder, decoder and memory attention, the encoder frozen; --train-encoder trains "
        "the whole network",
        json_schema_extra={"negative_flag": "--train-encoder"},
    )
    cache_embeddings: bool = Field(
        True, description="with a frozen encoder, embed each image once; --no-cache-embeddings re-embeds every step"
    )
    synthetic_fraction: float = Field(
        1.0, ge=0, le=1, description="share of synthetic samples (1.0 when there is no real data)"
    )
    synthetic_pool: int = Field(
        0, ge=0, description="0: fresh synthetic volumes each step; N: a fixed pool of N, embeddings cached when frozen"
    )
    synthetic_workers: int = Field(
        0, ge=0, description="host processes making synthetic volumes (0: made on the training device; a GPU wants ~8)"
    )
    data_dir: Path | None = Field(None, description="folder of *.pt {image, label} 128^3 training pairs")
    training_cache: Path | None = Field(
        None,
        description="label maps and real pairs (scripts/build_training_cache.py) to synthesise samples from on the "
        "training device (lib.training.synthesis)",
    )
    cache_fraction: float = Field(
        0.0, ge=0, le=1, description="share of samples synthesised from --training-cache; the rest as before"
    )
    seed: int = Field(0, description="seed of every random stream of the run")
    deterministic: bool = Field(
        True,
        description="deterministic kernels where torch has them (~20% slower on a GPU at batch 4); "
        "--no-deterministic is faster",
    )
    time_budget_s: float | None = Field(None, gt=0, description="stop (and checkpoint) before this many seconds")
    amp: Literal["auto", "bf16", "none"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on the CPU")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    keep_weights: Literal["best", "latest"] = Field(
        "best",
        description="validated weights the run keeps at best_path: the best score, or the latest that beats the "
        "starting weights (for validation on the training images themselves, where the best score is noise)",
    )
    log_every: int = Field(10, ge=1, description="steps between log lines")
    checkpoint_every: int = Field(200, ge=1, description="steps between checkpoints (weights and training state)")
    validate_every: int = Field(
        0,
        ge=0,
        description="steps between validations (0: only before and after training); needs the validation crops "
        "that `fit`'s caller passes (the MONAI Label trainer)",
    )

    @property
    def state_path(self) -> Path:
        """Where the training state for `--resume` is written, beside the weights."""
        return self.out.with_name(self.out.name + ".state.pt")

    @property
    def best_path(self) -> Path:
        """Where the validated weights `keep_weights` chooses are written, beside the weights."""
        return self.out.with_name(self.out.name.removesuffix(".pt") + ".best.pt")

    @model_validator(mode="after")
    def _cache_options_agree(self) -> FitConfig:
        # one without the other would be ignored without a word
        if (self.training_cache is None) != (self.cache_fraction == 0):
            raise ValueError("training_cache and cache_fraction go together: give both (a fraction above 0) or neither")
        return self

    def replace(self, **changes: Any) -> FitConfig:
        """A copy with `changes`, validated as a new config is."""
        return FitConfig.model_validate({**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain values (paths as strings), for the weights file's metadata."""
        return self.model_dump(mode="json")
