"""Checkpoints of a training run: the weights (`save_mais`) and a training state `<out>.state.pt` (model,
optimiser, step, random states), both written atomically, so that `--resume` continues a run exactly where it
stopped."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lib.atomic_file import atomic_torch_save
from lib.model.config import MaisConfig
from lib.model.mais import Mais
from lib.model.weights import save_mais
from lib.training.config import FitConfig
from lib.training.progress import TrainingLog

logger = logging.getLogger(__name__)

STATE_FORMAT = "mais-training-state"


@dataclass(frozen=True)
class RandomStreams:
    """The run's random streams at one moment: numpy's (batch mix, clicks), the batch source's torch generator and
    torch's global one. Captured when a step ends, before the next batch is drawn, so that a run resumed from
    that step draws the batch the uninterrupted run drew."""

    numpy_state: dict[str, Any]
    generator_state: torch.Tensor
    torch_state: torch.Tensor

    @classmethod
    def capture(cls, rng: np.random.Generator, generator: torch.Generator) -> RandomStreams:
        return cls(copy.deepcopy(rng.bit_generator.state), generator.get_state(), torch.get_rng_state())


def save_checkpoint(
    model: Mais,
    optimiser: torch.optim.Optimizer,
    streams: RandomStreams,
    step: int,
    config: FitConfig,
    last_log: TrainingLog | None,
) -> None:
    """The weights to `config.out` and the training state for --resume to `config.state_path`."""
    metadata = {
        "trained_steps": step,
        "fit_config": config.to_dict(),
        "train_dice_at_click": {str(k): v for k, v in last_log.dice_at_click.items()} if last_log else {},
    }
    save_mais(model, config.out, metadata=metadata)
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "mais_config": model.config.to_dict(),
        "model_state_dict": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "numpy_rng": streams.numpy_state,
        "torch_generator": streams.generator_state,
        "torch_rng": streams.torch_state,
    }
    atomic_torch_save(state, config.state_path)


def load_checkpoint(
    path: Path, model: Mais, optimiser: torch.optim.Optimizer, rng: np.random.Generator, generator: torch.Generator
) -> int:
    """Restore a training state written by `save_checkpoint` into the freshly built objects; returns the step
    reached. The state holds only tensors and plain values, so torch reads it without unpickling objects. The
    learning-rate scales of the optimiser's groups stay this run's (`make_optimiser`), not the saved ones."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume {path}: not a training state written by lib.training.fit")
    # through MaisConfig, so that a state written before a config field existed reads as its default
    if MaisConfig.from_dict(state["mais_config"]).to_dict() != model.config.to_dict():
        raise ValueError(
            f"--resume {path}: trained {state['mais_config']['name']} / memory "
            f"{state['mais_config']['memory_mode']}, this run builds another model"
        )
    model.load_state_dict(state["model_state_dict"])
    scales = [group["lr_scale"] for group in optimiser.param_groups]
    optimiser.load_state_dict(state["optimiser"])  # which sets every group's settings to the saved ones
    for group, scale in zip(optimiser.param_groups, scales):
        group["lr_scale"] = scale
    rng.bit_generator.state = state["numpy_rng"]
    generator.set_state(state["torch_generator"])
    torch.set_rng_state(state["torch_rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])
