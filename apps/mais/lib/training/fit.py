"""Train a MAIS model with the interaction loop: a library function (`fit`) and a CLI.

    cd apps/mais && python -m lib.training.fit --help

Stages of the shipped weights (issue 6): (1) the light encoder trains with the whole network on synthetic
volumes (`--train-encoder --memory-mode none`); (2) the encoder is frozen (`--init stage1.pt`) and the prompt
encoder, mask decoder and memory attention fine-tune on real crops plus synthetic volumes.

Data: each sample is a 128^3 crop and one binary target. Sources, mixed per sample by `synthetic_fraction`:
- real crops: `StructureCrop`s passed to `fit`, or `--data-dir`, a folder of `*.pt` files written by
  `save_training_pair` ({"image": float [1, 128, 128, 128] normalised, "label": int or bool [1, 128, 128, 128]};
  each non-zero label value is its own target);
- synthetic volumes (lib.training.synthetic): fresh every step, or a fixed pool of `synthetic_pool` volumes;
  made on the training device, or by `synthetic_workers` host processes (what keeps a GPU busy).
With the encoder frozen, image embeddings are computed once per image (real crops and the synthetic pool) and
kept in memory on the training device; fresh synthetic volumes are embedded every step.

Validation (optional, `val_crops`): Dice after each click on held-out crops (lib.training.validation), before
the first step (the starting weights' baseline), every `validate_every` steps and at the end; the weights that
beat the baseline and every earlier validation are also written to `<out stem>.best.pt` (`FitConfig.best_path`).

Several GPUs: `lib.training.distributed.fit_distributed` runs `fit` once per GPU under torch DDP; each process
draws its own samples, gradients are averaged, and only rank 0 validates, logs and writes files.

Checkpoints: the weights go to `out` with `save_mais` (atomic) at the end and every `checkpoint_every` steps,
together with a training state `<out>.state.pt` (model, optimiser, step, random states; atomic too).
`--resume <out>.state.pt` continues a run exactly where it stopped; `time_budget_s` stops a run cleanly (and
checkpoints) before the device's per-call limit. Given the seed, a run is deterministic on the CPU; on a GPU up
to the CUDA kernels torch has no deterministic version of (trilinear upsampling's backward uses atomic adds).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lib.model.build import PROMPT_CLICKS, MaisConfig, atomic_torch_save, build_mais, load_mais, save_mais
from lib.model.mais import Mais
from lib.model.memory_attention import MEMORY_MODES
from lib.training.interaction_loop import InteractionConfig, run_interaction
from lib.training.real_data import StructureCrop
from lib.training.synthetic import SyntheticConfig, synthetic_sample, synthetic_stream
from lib.training.validation import ValidationResult, validate

logger = logging.getLogger(__name__)

ENCODERS: dict[str, Callable[..., MaisConfig]] = {"light": MaisConfig.light, "sam_med3d": MaisConfig.sam_med3d}
STATE_FORMAT = "mais-training-state"
# Click numbers whose Dice is logged (1-based); those beyond K are left out.
LOGGED_CLICKS = (1, 5, 10)


@dataclass(frozen=True)
class FitConfig:
    """One training run. Paths may be None where optional."""

    out: Path = Path("mais_weights.pt")
    encoder: str = "light"  # the network trained from scratch when there is no `init`
    memory_mode: str = "both"
    memory_size: int = 60
    prompt_clicks: str = "all"  # MaisConfig.prompt_clicks of the trained model: "all" or "latest"
    init: Path | None = None  # start from these MAIS weights (their network; memory and prompt settings from here)
    fresh_memory: bool = False  # with init: start the memory attention afresh (equal start for memory comparisons)
    resume: Path | None = None  # a training state `<out>.state.pt` to continue
    steps: int = 1000
    batch_size: int = 2
    lr: float = 1e-4
    memory_lr_scale: float = 1.0  # the memory attention learns at lr x this (it starts from zero, the rest does not)
    weight_decay: float = 0.01
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    clicks: int = 10
    ce_weight: float = 0.0
    freeze_encoder: bool = True
    cache_embeddings: bool = True  # with a frozen encoder: embed each image once (False: every step, to compare)
    synthetic_fraction: float = 1.0  # chance that a sample is synthetic (1.0 when there are no real crops)
    synthetic_pool: int = 0  # 0: fresh synthetic volumes every step; N > 0: a fixed pool of N (cacheable)
    synthetic_workers: int = 0  # 0: synthetic volumes are made on the training device; N: by N host processes
    data_dir: Path | None = None
    seed: int = 0
    deterministic: bool = True  # deterministic kernels where torch has them (~20% slower on a GPU at batch 4)
    time_budget_s: float | None = None
    amp: str = "auto"  # "auto" (bf16 on CUDA, none on CPU), "bf16" or "none"
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 200
    validate_every: int = 0  # steps between validations (0: only before and after training); needs val_crops

    def __post_init__(self) -> None:
        if self.encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {sorted(ENCODERS)}, got {self.encoder!r}")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}")
        if self.prompt_clicks not in PROMPT_CLICKS:
            raise ValueError(f"prompt_clicks must be one of {PROMPT_CLICKS}, got {self.prompt_clicks!r}")
        if self.amp not in ("auto", "bf16", "none"):
            raise ValueError(f"amp must be auto, bf16 or none, got {self.amp!r}")
        if not 0.0 <= self.synthetic_fraction <= 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1], got {self.synthetic_fraction}")
        if self.memory_lr_scale <= 0:
            raise ValueError(f"memory_lr_scale must be > 0, got {self.memory_lr_scale}")
        if self.synthetic_workers < 0:
            raise ValueError(f"synthetic_workers must be >= 0, got {self.synthetic_workers}")
        if min(self.steps, self.batch_size, self.clicks, self.log_every, self.checkpoint_every) < 1:
            raise ValueError("steps, batch_size, clicks, log_every and checkpoint_every must be >= 1")
        if self.validate_every < 0:
            raise ValueError(f"validate_every must be >= 0, got {self.validate_every}")

    @property
    def state_path(self) -> Path:
        """Where the training state for `--resume` is written, beside the weights."""
        return self.out.with_name(self.out.name + ".state.pt")

    @property
    def best_path(self) -> Path:
        """Where the weights with the best validation score are written, beside the weights."""
        return self.out.with_name(self.out.name.removesuffix(".pt") + ".best.pt")

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class TrainingLog:
    """One log line: means over the last `log_every` steps. dice_at_click: {click number: mean hard Dice}."""

    step: int
    steps: int
    loss: float
    dice_at_click: dict[int, float]
    lr: float
    samples_per_s: float
    elapsed_s: float


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


# ------------------------------------------------------------------------------------------------------- data


@dataclass
class _Target:
    """One real training target: image [1, S, S, S] float32 (CPU), mask [1, S, S, S] bool (CPU), and the key of
    its image in the embedding cache (targets of one image share it)."""

    image_key: str
    image: Tensor
    mask: Tensor


def save_training_pair(path: str | os.PathLike, image: Tensor, label: Tensor) -> None:
    """Write one `--data-dir` file: image float [1, S, S, S] normalised, label int or bool [1, S, S, S]."""
    torch.save({"image": image.float().cpu(), "label": label.cpu()}, path)


def load_training_pairs(data_dir: Path, size: int) -> list[_Target]:
    """Every (image, non-zero label value) target of the `*.pt` files in `data_dir` (see `save_training_pair`)."""
    targets = []
    for path in sorted(Path(data_dir).glob("*.pt")):
        pair = torch.load(path, map_location="cpu", weights_only=True)
        image, label = pair["image"].float(), pair["label"]
        if image.shape != (1, size, size, size) or label.shape != image.shape:
            raise ValueError(f"{path}: image {tuple(image.shape)} / label {tuple(label.shape)}, expected [1, {size}^3]")
        for value in torch.unique(label).tolist():
            if value:
                targets.append(_Target(path.stem, image, label == value))
    logger.info("%s: %d targets", data_dir, len(targets))
    return targets


class _BatchSource:
    """Draws training batches from real targets and synthetic volumes.

    `next_batch` returns (image_keys, images [B, 1, S, S, S], masks bool [B, 1, S, S, S]) on `device`; a key is
    None for a fresh synthetic volume (nothing to cache).
    """

    def __init__(self, config: FitConfig, targets: Sequence[_Target], size: int, device: torch.device) -> None:
        self.config = config
        self.targets = list(targets)
        self.device = device
        self.synthetic_config = SyntheticConfig(size=size)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.seed + 1)
        self.stream = None
        if config.synthetic_workers and (config.synthetic_fraction > 0 or not self.targets):
            self.stream = synthetic_stream(config.seed + 1, config.synthetic_workers, self.synthetic_config)
        self.pool = [self._synthetic() for _ in range(config.synthetic_pool)]
        self.synthetic_fraction = config.synthetic_fraction if self.targets else 1.0

    def next_batch(self, rng: np.random.Generator) -> tuple[list[str | None], Tensor, Tensor]:
        keys, images, masks = [], [], []
        for _ in range(self.config.batch_size):
            key, image, mask = self._sample(rng)
            keys.append(key)
            images.append(image.to(self.device, non_blocking=True))
            masks.append(mask.to(self.device, non_blocking=True))
        return keys, torch.stack(images), torch.stack(masks)

    def _sample(self, rng: np.random.Generator) -> tuple[str | None, Tensor, Tensor]:
        if rng.random() < self.synthetic_fraction:
            if not self.pool:
                return (None, *self._synthetic())
            index = int(rng.integers(len(self.pool)))
            return (f"synthetic:{index}", *self.pool[index])
        target = self.targets[int(rng.integers(len(self.targets)))]
        return f"real:{target.image_key}", target.image, target.mask

    def close(self) -> None:
        """Stop the synthetic workers now. Left to interpreter exit, their shutdown aborted them on the GPU
        machine ("terminate called without an active exception"); dropping the last reference to the loader's
        iterator shuts them down in order."""
        self.stream = None

    def _synthetic(self) -> tuple[Tensor, Tensor]:
        if self.stream is not None:
            return next(self.stream)
        return synthetic_sample(self.generator, self.synthetic_config)


class _EmbeddingCache:
    """Image embeddings of a frozen encoder, computed once per image key and kept on the training device."""

    def __init__(self) -> None:
        self.embeddings: dict[str, Tensor] = {}
        self.hits = 0

    def embed(self, model: Mais, keys: Sequence[str | None], images: Tensor) -> Tensor:
        """[B, E, 8, 8, 8] for images [B, 1, S, S, S]; runs the encoder only on images not cached yet."""
        missing = [i for i, key in enumerate(keys) if key is None or key not in self.embeddings]
        self.hits += len(keys) - len(missing)
        computed: dict[int, Tensor] = {}
        if missing:
            with torch.no_grad():
                computed = dict(zip(missing, model.embed_image(images[missing]).float()))
            self.embeddings.update({keys[i]: e for i, e in computed.items() if keys[i] is not None})
        return torch.stack([computed[i] if i in computed else self.embeddings[key] for i, key in enumerate(keys)])


class _InteractionStep(nn.Module):
    """The training forward pass as one module: torch DDP averages the gradients of what runs in `forward`, so
    the embedding (cached or not) and the whole K-click interaction must run inside it."""

    def __init__(self, model: Mais, cache: _EmbeddingCache | None, interaction: InteractionConfig) -> None:
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
        result = run_interaction(self.model, embeddings, masks, rng, self.interaction)
        return result.loss, result.dice_per_click


# ----------------------------------------------------------------------------------------------------- model


def build_model(config: FitConfig, device: torch.device) -> Mais:
    """The model to train, in train mode on `device`, its encoder frozen when asked: the `init` weights file's
    network with this run's memory settings, or a random `encoder` network when there is no `init`."""
    torch.manual_seed(config.seed)  # the random initialisation is part of the run's seed
    if config.init is None:
        network = ENCODERS[config.encoder](
            memory_mode=config.memory_mode, memory_size=config.memory_size, prompt_clicks=config.prompt_clicks
        )
        model = build_mais(network)
    else:
        model = _model_from_init(config)
    model.to(device).train()
    set_encoder_frozen(model, config.freeze_encoder)
    return model


def _model_from_init(config: FitConfig) -> Mais:
    """The `init` file's network with this run's memory mode and size, loaded with every weight whose shape still
    fits. Only memory-attention weights may start fresh (its age embeddings are sized by memory_size, so a
    stage-1 file trained with N = 60 also starts an N = 10 run); any other mismatch is an error."""
    source = load_mais(config.init, device="cpu")
    model = build_mais(
        dataclasses.replace(
            source.config,
            memory_mode=config.memory_mode,
            memory_size=config.memory_size,
            prompt_clicks=config.prompt_clicks,
        )
    )
    source_state = source.state_dict()
    fresh = [
        k
        for k, v in model.state_dict().items()
        if k not in source_state
        or source_state[k].shape != v.shape
        or (config.fresh_memory and k.startswith("memory_attention."))
    ]
    foreign = [k for k in fresh if not k.startswith("memory_attention.")]
    if foreign:
        raise ValueError(f"--init {config.init}: weight {foreign[0]!r} does not fit this network")
    model.load_state_dict({k: v for k, v in source_state.items() if k not in fresh}, strict=False)
    logger.info("initialised %s from %s; fresh: %s", source.config.name, config.init, ", ".join(fresh) or "nothing")
    return model


def set_encoder_frozen(model: Mais, frozen: bool) -> None:
    """Freeze (no gradients, eval mode) or unfreeze the image encoder; the rest of the model is left as it is."""
    model.image_encoder.requires_grad_(not frozen)
    model.image_encoder.train(not frozen and model.training)


def make_optimiser(model: Mais, config: FitConfig) -> tuple[torch.optim.Optimizer, LearningRateSchedule]:
    """AdamW over the trainable parameters, and the schedule that sets their learning rates every step.

    The memory attention is a group of its own at `memory_lr_scale` x lr: its output projection starts at zero,
    and at the rest's learning rate it stayed near zero (after 215 steps at 2e-4 its weights averaged |w| 0.0008,
    and the memory changed no Dice: benchmarks/results/memory_comparison/README.md)."""
    memory = {id(p) for p in model.memory_attention.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in memory], "lr_scale": 1.0},
        {"params": [p for p in trainable if id(p) in memory], "lr_scale": config.memory_lr_scale},
    ]
    optimiser = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, weight_decay=config.weight_decay)
    warmup = min(config.warmup_steps, max(1, config.steps // 10))
    return optimiser, LearningRateSchedule(optimiser, config.lr, warmup, config.steps, config.time_budget_s)


@dataclass
class LearningRateSchedule:
    """Linear warm-up over `warmup` steps, then cosine decay to 10% of `peak_lr` at progress 1.

    Progress is the larger of step / steps and, with a time budget, the share of the budget used: a run that the
    device's clock stops still ends its decay instead of stopping at a high learning rate, whatever its speed.
    The budget counts per call, so a resumed run decays over the rest of its steps or its new budget.
    """

    optimiser: torch.optim.Optimizer
    peak_lr: float
    warmup: int
    steps: int
    time_budget_s: float | None = None

    def apply(self, step: int, elapsed_s: float) -> float:
        """Set the learning rates of optimiser step `step` (0-based), `elapsed_s` into the budget (each group's
        `lr_scale` times the schedule's); returns the schedule's."""
        if step < self.warmup:
            factor = (step + 1) / self.warmup
        else:
            progress = (step - self.warmup) / max(1, self.steps - self.warmup)
            if self.time_budget_s:
                progress = max(progress, elapsed_s / self.time_budget_s)
            factor = 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        for group in self.optimiser.param_groups:
            group["lr"] = self.peak_lr * factor * group.get("lr_scale", 1.0)
        return self.peak_lr * factor


# ------------------------------------------------------------------------------------------------------ fit


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
    if config.deterministic and device.type == "cuda":
        torch.backends.cudnn.benchmark = False
    model = build_model(config, device)
    optimiser, schedule = make_optimiser(model, config)
    targets = [_Target(crop.name, crop.volume, crop.mask) for crop in crops]
    if config.data_dir is not None:
        targets += load_training_pairs(config.data_dir, model.img_size)
    # every process draws its own samples and clicks; the model starts identical (DDP broadcasts rank 0's)
    source = _BatchSource(dataclasses.replace(config, seed=config.seed + rank), targets, model.img_size, device)
    rng = np.random.default_rng(config.seed + rank)
    step = 0
    if config.resume is not None:
        step = _load_state(config.resume, model, optimiser, rng, source.generator)
        if rank:  # the state holds rank 0's random streams: the other ranks need streams of their own again
            rng = np.random.default_rng([config.seed, rank, step])
            source.generator.manual_seed(hash((config.seed, rank, step)) % 2**63)
    cache = _EmbeddingCache() if config.freeze_encoder and config.cache_embeddings else None
    interaction_step = _InteractionStep(
        model, cache, InteractionConfig(num_clicks=config.clicks, ce_weight=config.ce_weight)
    )
    if world_size > 1:
        interaction_step = nn.parallel.DistributedDataParallel(
            interaction_step,
            device_ids=[device.index] if device.type == "cuda" else None,
            # memory attention has nothing to attend to at click 1 and runs not at all in mode "none"
            find_unused_parameters=True,
        )
    autocast = _autocast(config.amp, device)
    validation = _Validation(config, val_crops, model, cache, on_validation) if val_crops and is_main else None
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
    while step < config.steps:
        step_started = time.monotonic()
        lr = schedule.apply(step, budget_used_s)
        keys, images, masks = source.next_batch(rng)
        with autocast:
            loss, dice_per_click = interaction_step(keys, images, masks, rng)
        _optimise(loss, optimiser, config.max_grad_norm)
        step += 1
        samples += len(keys) * world_size
        window.append((loss.item(), dice_per_click.cpu()))
        slowest_step_s = max(slowest_step_s, time.monotonic() - step_started)

        if is_main and (step % config.log_every == 0 or step == config.steps):
            elapsed = time.monotonic() - loop_started
            last_log = _training_log(window, step, config.steps, lr, samples / elapsed, elapsed)
            logger.info(_format_log(last_log, cache))
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
            _save(model, optimiser, rng, source.generator, step, config, last_log)
        if out_of_time:
            logger.info(
                "time budget %.0f s reached after step %d; resume with --resume %s",
                config.time_budget_s,
                step,
                config.state_path,
            )
            break

    source.close()
    samples_per_s = samples / max(time.monotonic() - loop_started, 1e-9)
    result = FitResult(step, step >= config.steps, config.out, config.state_path, last_log, samples_per_s)
    if validation is not None:
        result.baseline, result.best, result.best_step = validation.baseline, validation.best, validation.best_step
    return result


class _Validation:
    """Runs `validate` on rank 0, keeps the baseline (the starting weights, step 0 of a fresh run) and the best
    result since, and writes the best weights to `config.best_path` whenever the score improves on both."""

    def __init__(self, config: FitConfig, crops, model: Mais, cache: _EmbeddingCache | None, on_validation) -> None:
        self.config, self.crops, self.model, self.on_validation = config, list(crops), model, on_validation
        # the cache's "validation:<i>" keys never meet the training keys ("real:...", "synthetic:...")
        self.embed = (lambda key, volume: cache.embed(model, [key], volume)) if cache is not None else None
        self.baseline: ValidationResult | None = None
        self.best: ValidationResult | None = None
        self.best_step = 0

    def run(self, step: int) -> ValidationResult:
        result = validate(self.model, self.crops, self.config.clicks, step, self.embed, seed=self.config.seed)
        dice = " ".join(f"dice@{k} {v:.3f}" for k, v in result.dice_at(LOGGED_CLICKS).items())
        if step == 0:
            self.baseline = result
            logger.info("validation before training (%d crops): %s score %.4f", len(self.crops), dice, result.score)
        else:
            reference = max((r.score for r in (self.baseline, self.best) if r is not None), default=-1.0)
            improved = result.score > reference
            if improved:
                self.best, self.best_step = result, step
                save_mais(
                    self.model,
                    self.config.best_path,
                    metadata={
                        "trained_steps": step,
                        "validation": {"dice_per_click": result.dice_per_click, "score": result.score},
                    },
                )
            logger.info(
                "validation at step %d: %s score %.4f%s", step, dice, result.score, " (best so far)" if improved else ""
            )
        if self.on_validation is not None:
            self.on_validation(result)
        return result


def _slowest_process(clock_s: list[float], device: torch.device) -> list[float]:
    """Each clock reading's maximum over the training processes. They must agree on when to stop (or the others
    would wait forever for one's gradients) and on the learning rate (or their weights would drift apart)."""
    if not dist.is_initialized():
        return clock_s
    value = torch.tensor(clock_s, dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.tolist()


def _optimise(loss: Tensor, optimiser: torch.optim.Optimizer, max_grad_norm: float) -> None:
    """One optimiser step on `loss`, gradients clipped to `max_grad_norm` (ten summed step losses can spike)."""
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in optimiser.param_groups for p in group["params"]], max_grad_norm)
    optimiser.step()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _autocast(amp: str, device: torch.device) -> torch.autocast:
    enabled = amp == "bf16" or (amp == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _training_log(window: deque, step: int, steps: int, lr: float, samples_per_s: float, elapsed: float) -> TrainingLog:
    losses = [loss for loss, _ in window]
    dice = torch.stack([d for _, d in window]).mean(0)
    dice_at_click = {k: float(dice[k - 1]) for k in LOGGED_CLICKS if k <= len(dice)}
    return TrainingLog(step, steps, float(np.mean(losses)), dice_at_click, lr, samples_per_s, elapsed)


def _format_log(log: TrainingLog, cache: _EmbeddingCache | None) -> str:
    dice = " ".join(f"dice@{k} {v:.3f}" for k, v in log.dice_at_click.items())
    cached = f" cache {len(cache.embeddings)} images, {cache.hits} hits" if cache is not None else ""
    return (
        f"step {log.step}/{log.steps} loss {log.loss:.4f} {dice} lr {log.lr:.2e} "
        f"{log.samples_per_s:.2f} samples/s {log.elapsed_s:.0f} s{cached}"
    )


# ----------------------------------------------------------------------------------------------- checkpoints


def _save(model, optimiser, rng, generator, step: int, config: FitConfig, last_log: TrainingLog | None) -> None:
    """The weights (save_mais) and the training state for --resume, both written atomically."""
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
        "numpy_rng": rng.bit_generator.state,
        "torch_generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
    }
    atomic_torch_save(state, config.state_path)


def _load_state(path: Path, model, optimiser, rng, generator) -> int:
    """Restore a training state written by `_save` into the freshly built objects; returns the step reached."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: holds numpy rng state dicts
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"--resume {path}: not a training state written by lib.training.fit")
    if state["mais_config"] != model.config.to_dict():
        raise ValueError(
            f"--resume {path}: trained {state['mais_config']['name']} / memory "
            f"{state['mais_config']['memory_mode']}, this run builds another model"
        )
    model.load_state_dict(state["model_state_dict"])
    optimiser.load_state_dict(state["optimiser"])
    rng.bit_generator.state = state["numpy_rng"]
    generator.set_state(state["torch_generator"])
    torch.set_rng_state(state["torch_rng"])
    logger.info("resumed from %s at step %d", path, state["step"])
    return int(state["step"])


# -------------------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> tuple[FitConfig, int]:
    """(the run's FitConfig, the number of GPUs to train on)."""
    defaults = FitConfig()
    parser = argparse.ArgumentParser(prog="python -m lib.training.fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=defaults.out, help="weights file to write (save_mais)")
    parser.add_argument(
        "--encoder",
        choices=sorted(ENCODERS),
        default=defaults.encoder,
        help="network trained from scratch (ignored with --init, which brings its own)",
    )
    parser.add_argument("--memory-mode", choices=MEMORY_MODES, default=defaults.memory_mode)
    parser.add_argument("--memory-size", type=int, default=defaults.memory_size, help="FIFO capacity N")
    parser.add_argument(
        "--prompt-clicks",
        choices=PROMPT_CLICKS,
        default=defaults.prompt_clicks,
        help="clicks the prompt encoder gets each step: all so far, or the latest only (SAM-Med3D's training)",
    )
    parser.add_argument(
        "--init",
        type=Path,
        help="start from these MAIS weights (e.g. stage 1's): their network, this run's memory mode and size",
    )
    parser.add_argument(
        "--fresh-memory", action="store_true", help="with --init: memory attention starts afresh, not from the file"
    )
    parser.add_argument("--resume", type=Path, help="continue from a training state <out>.state.pt")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="total optimiser steps of the run")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument(
        "--memory-lr-scale",
        type=float,
        default=defaults.memory_lr_scale,
        help="the memory attention's learning rate is lr x this (it starts from zero)",
    )
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--clicks", type=int, default=defaults.clicks, help="interaction steps K per sample")
    parser.add_argument("--ce-weight", type=float, default=defaults.ce_weight, help="add BCE to the Dice loss")
    encoder = parser.add_mutually_exclusive_group()
    encoder.add_argument(
        "--freeze-encoder",
        dest="freeze_encoder",
        action="store_true",
        default=defaults.freeze_encoder,
        help="train prompt encoder, decoder and memory attention; cache embeddings (default)",
    )
    encoder.add_argument("--train-encoder", dest="freeze_encoder", action="store_false", help="train the whole network")
    parser.add_argument(
        "--cache-embeddings",
        action=argparse.BooleanOptionalAction,
        default=defaults.cache_embeddings,
        help="with a frozen encoder, embed each image once; --no-cache-embeddings re-embeds every step",
    )
    parser.add_argument(
        "--synthetic-fraction",
        type=float,
        default=defaults.synthetic_fraction,
        help="share of synthetic samples (1.0 when there is no real data)",
    )
    parser.add_argument(
        "--synthetic-pool",
        type=int,
        default=defaults.synthetic_pool,
        help="0: fresh synthetic volumes each step; N: a fixed pool of N, embeddings cached when frozen",
    )
    parser.add_argument(
        "--synthetic-workers",
        type=int,
        default=defaults.synthetic_workers,
        help="host processes making synthetic volumes (0: made on the training device; a GPU run wants ~8)",
    )
    parser.add_argument("--data-dir", type=Path, help="folder of *.pt {image, label} 128^3 training pairs")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--deterministic",
        action=argparse.BooleanOptionalAction,
        default=defaults.deterministic,
        help="deterministic kernels (warn where torch has none); --no-deterministic is faster on a GPU",
    )
    parser.add_argument("--time-budget-s", type=float, help="stop (and checkpoint) before this many seconds")
    parser.add_argument(
        "--amp",
        choices=("auto", "bf16", "none"),
        default=defaults.amp,
        help="auto: bf16 autocast on CUDA, fp32 on the CPU",
    )
    parser.add_argument("--device", default=defaults.device, help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument(
        "--gpus", type=int, default=1, help="train on this many GPUs with DDP (--batch-size is per GPU)"
    )
    args = vars(parser.parse_args(argv))
    gpus = args.pop("gpus")
    return FitConfig(**args), gpus


def main(argv: Sequence[str] | None = None) -> FitResult:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config, gpus = parse_args(argv)
    if gpus > 1:
        from lib.training.distributed import fit_distributed  # imports this module: imported here, not at the top

        result = fit_distributed(config, gpus)
    else:
        result = fit(config)
    status = "finished" if result.finished else "stopped by the time budget"
    dice = result.last_log.dice_at_click if result.last_log else {}
    print(
        f"{status} at step {result.steps_done}/{config.steps}: {result.samples_per_s:.2f} samples/s, "
        f"train Dice {dice}; weights {result.weights_path}, state {result.state_path}"
    )
    return result


if __name__ == "__main__":
    main()
