"""The training loop: `fit` trains a MAIS model with the interaction loop (lib.training.interaction_loop).

Each step draws a batch (lib.training.data_sources), runs K clicks on it, and takes one optimiser step
(lib.training.optimisation). With the encoder frozen, image embeddings are computed once per image (real crops
and the synthetic pool) and kept on the training device; fresh synthetic volumes are embedded every step.

Validation (optional, `val_crops`): Dice after each click on held-out crops (lib.training.validation), before
the first step (the starting weights' baseline), every `validate_every` steps and at the end; the weights that
beat the baseline and every earlier validation are also written to `<out stem>.best.pt` (`FitConfig.best_path`).

Several GPUs: `lib.training.distributed.fit_distributed` runs `fit` once per GPU under torch DDP; each process
draws its own samples, gradients are averaged, and only rank 0 validates, logs and writes files.

Checkpoints (lib.training.checkpoint) at the end and every `checkpoint_every` steps; `time_budget_s` stops a run
cleanly (and checkpoints) before the device's per-call limit. Given the seed, a run is deterministic on the CPU;
on a GPU up to the CUDA kernels torch has no deterministic version of (trilinear upsampling's backward uses
atomic adds).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lib.devices import resolve_device
from lib.model.mais import Mais
from lib.training.checkpoint import RandomStreams, load_checkpoint, save_checkpoint
from lib.training.config import FitConfig
from lib.training.data_sources import BatchSource, EmbeddingCache, Target, load_training_pairs
from lib.training.initial_model import build_model
from lib.training.interaction_loop import TRAINING_CLICK_MIXES, InteractionConfig, run_interaction
from lib.training.optimisation import make_optimiser, optimise
from lib.training.progress import TrainingLog, ValidationTracker, format_log, training_log
from lib.training.real_data import StructureCrop
from lib.training.validation import ValidationResult

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """How a run ended. finished: all `steps` done (False when the time budget stopped it first).

    With validation crops: `baseline` is the starting weights' validation, `best` the best one after it, and
    `best_step` > 0 when some step beat the baseline (its weights are at `FitConfig.best_path`), else 0."""

    steps_done: int
    finished: bool
    weights_path: Path
    state_path: Path
    last_log: TrainingLog | None
    samples_per_s: float
    baseline: ValidationResult | None = None
    best: ValidationResult | None = None
    best_step: int = 0


class InteractionStep(nn.Module):
    """The training forward pass as one module: torch DDP averages the gradients of what runs in `forward`, so
    the embedding (cached or not) and the whole K-click interaction must run inside it."""

    def __init__(self, model: Mais, cache: EmbeddingCache | None, interaction: InteractionConfig) -> None:
        super().__init__()
        self.model = model
        self.cache = cache
        self.interaction = interaction

    def forward(
        self, keys: list[str | None], images: Tensor, masks: Tensor, rng: np.random.Generator
    ) -> tuple[Tensor, Tensor]:
        """(loss, dice_per_click [K]) of one batch, as `run_interaction` returns them."""
        if self.cache is not None:
            embeddings = self.cache.embed(self.model, keys, images)
        else:
            embeddings = self.model.embed_image(images)
        result = run_interaction(self.model, embeddings, images, masks, rng, self.interaction)
        return result.loss, result.dice_per_click


def fit(
    config: FitConfig,
    crops: Sequence[StructureCrop] = (),
    val_crops: Sequence[StructureCrop] = (),
    on_log: Callable[[TrainingLog], None] | None = None,
    on_validation: Callable[[ValidationResult], None] | None = None,
) -> FitResult:
    """Train as `config` says; returns how the run ended. crops: real training crops (added to `data_dir`'s);
    val_crops: validation crops (see the module docstring).

    on_log / on_validation are called with every TrainingLog / ValidationResult (the MONAI Label trainer reports
    them in /train status). Inside a torch.distributed process group (`fit_distributed`) the model trains under
    DDP and only rank 0 validates, calls back and writes files.
    """
    fit_started = time.monotonic()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    is_main = rank == 0
    device = resolve_device(config.device)
    torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
    if device.type == "cuda":  # cuDNN's autotuner picks the fastest kernels, not always the same ones
        torch.backends.cudnn.benchmark = not config.deterministic
    model = build_model(config, device)
    optimiser, schedule = make_optimiser(model, config)
    targets = [Target(crop.name, crop.volume, crop.mask) for crop in crops]
    if config.data_dir is not None:
        targets += load_training_pairs(config.data_dir, model.img_size)
    # every process draws its own samples and clicks; the model starts identical (DDP broadcasts rank 0's)
    source = BatchSource(config.replace(seed=config.seed + rank), targets, model.img_size, device)
    rng = np.random.default_rng(config.seed + rank)
    step = 0
    if config.resume is not None:
        step = load_checkpoint(config.resume, model, optimiser, rng, source.generator)
        if rank:  # the state holds rank 0's random streams: the other ranks need streams of their own again
            rng = np.random.default_rng([config.seed, rank, step])
            source.generator.manual_seed(hash((config.seed, rank, step)) % 2**63)
    cache = EmbeddingCache() if config.freeze_encoder and config.cache_embeddings else None
    interaction_step = InteractionStep(
        model,
        cache,
        InteractionConfig(
            num_clicks=config.clicks,
            clicks=TRAINING_CLICK_MIXES[config.click_mix],
            ce_weight=config.ce_weight,
            click_weight=config.click_loss_weight,
        ),
    )
    if world_size > 1:
        interaction_step = nn.parallel.DistributedDataParallel(
            interaction_step,
            device_ids=[device.index] if device.type == "cuda" else None,
            # memory attention has nothing to attend to at click 1 and runs not at all in mode "none"
            find_unused_parameters=True,
        )
    autocast = _autocast(config.amp, device)
    validation = ValidationTracker(config, val_crops, model, cache, on_validation) if val_crops and is_main else None
    logger.info(
        "training %s (memory %s, N=%d, prompt clicks %s) on %s x%d: steps %d-%d, batch %d, K=%d, encoder %s, "
        "%d real targets, synthetic %.2f",
        model.config.name,
        config.memory_mode,
        config.memory_size,
        config.prompt_clicks,
        device,
        world_size,
        step + 1,
        config.steps,
        config.batch_size,
        config.clicks,
        "frozen" if config.freeze_encoder else "trained",
        len(targets),
        source.synthetic_fraction,
    )

    if validation is not None and step == 0:
        validation.run(step)
    window = deque(maxlen=config.log_every)  # (loss, dice_per_click [K]) of recent steps
    loop_started, samples, slowest_step_s, last_log = time.monotonic(), 0, 0.0, None
    budget_used_s = time.monotonic() - fit_started
    try:
        batch = source.next_batch(rng)
        while step < config.steps:
            step_started = time.monotonic()
            lr = schedule.apply(step, budget_used_s)
            keys, images, masks = batch
            with autocast:
                loss, dice_per_click = interaction_step(keys, images, masks, rng)
            optimise(loss, optimiser, config.max_grad_norm)
            step += 1
            samples += len(keys) * world_size
            streams = RandomStreams.capture(rng, source.generator)  # what this step's checkpoint resumes from
            # the next batch is drawn while the GPU still runs this step: the loss's value below waits for it, and
            # drawing after that wait left the GPU idle through the whole synthesis (runs 22-23: idle a third of
            # each step, at batch 128 and 192 alike)
            batch = source.next_batch(rng) if step < config.steps else None
            window.append((loss.item(), dice_per_click.cpu()))
            slowest_step_s = max(slowest_step_s, time.monotonic() - step_started)

            if is_main and (step % config.log_every == 0 or step == config.steps):
                elapsed = time.monotonic() - loop_started
                last_log = training_log(window, step, config.steps, lr, samples / elapsed, elapsed)
                logger.info(format_log(last_log, cache))
                if on_log is not None:
                    on_log(last_log)
            # the budget counts from the call (set-up included): it guards a wall-clock limit such as the device's
            now_s = time.monotonic() - fit_started
            budget_used_s, next_step_ends_s = _slowest_process([now_s, now_s + slowest_step_s], device)
            out_of_time = config.time_budget_s is not None and next_step_ends_s > config.time_budget_s
            if validation is not None and (
                (config.validate_every and step % config.validate_every == 0) or step == config.steps or out_of_time
            ):
                validation.run(step)
            if is_main and (step % config.checkpoint_every == 0 or step == config.steps or out_of_time):
                save_checkpoint(model, optimiser, streams, step, config, last_log)
            if out_of_time:
                logger.info(
                    "time budget %.0f s reached after step %d; resume with --resume %s",
                    config.time_budget_s,
                    step,
                    config.state_path,
                )
                break

    finally:  # the synthetic workers stop also when a step raises (out of memory in the server's process)
        source.close()
    samples_per_s = samples / max(time.monotonic() - loop_started, 1e-9)
    result = FitResult(step, step >= config.steps, config.out, config.state_path, last_log, samples_per_s)
    if validation is not None:
        result.baseline, result.best, result.best_step = validation.baseline, validation.best, validation.best_step
    return result


def _slowest_process(clock_s: list[float], device: torch.device) -> list[float]:
    """Each clock reading's maximum over the training processes. They must agree on when to stop (or the others
    would wait forever for one's gradients) and on the learning rate (or their weights would drift apart)."""
    if not dist.is_initialized():
        return clock_s
    value = torch.tensor(clock_s, dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.tolist()


def _autocast(amp: str, device: torch.device) -> torch.autocast:
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
