"""The `mais` trainer: fine-tunes the served weights on the datastore's final labels (Slicer's "Train", OHIF's
"Update Model", `POST /train/mais`).

A thin MONAI Label adapter around `lib.training`:
1. the request is validated (`TrainRequest`; a bad or unknown option is HTTP 422 naming it);
2. the datastore's final labels are split by image into training and validation, and every label of a
   multi-label map becomes its own binary target (`structure_crops`);
3. `fit` (one process, or `fit_distributed` with DDP over the visible GPUs) starts from the served weights and
   validates before training and after every epoch: Dice after clicks 1, 5 and 10 of the evaluation's
   deterministic click rule;
4. the weights of the best epoch on validation (with nothing held out, the last epoch whose validation beats
   the served weights: there the best score is noise) are published atomically to `<train_dir>/mais_trained.pt`,
   only if they beat the served ones on validation; the infer task reloads them on the next click, without a
   restart.

MONAI Label runs this in a subprocess, with `run_sync` too (lib/trainers/synchronous.py; `/train` status shows its
last log lines; `DELETE /train` kills it). A run killed at any point leaves the served weights untouched: they are
replaced by one os.replace, or not at all. Progress and results go to `<train_dir>/train_stats.json`, which
`/info` shows under `train_stats`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lib.atomic_file import atomic_write
from lib.configs.app_settings import AppSettings, MemoryMode
from lib.devices import DEVICE_NAMES, DeviceName
from lib.model.config import MEMORY_MODES, MaisConfig
from lib.model.weights import WeightsError
from lib.model_loader import ModelLoader
from lib.training.config import FitConfig
from lib.training.distributed import available_gpus, fit_distributed
from lib.training.loop import FitResult, fit
from lib.training.progress import LOGGED_CLICKS, TrainingLog
from lib.training.real_data import MAX_CROP_SHIFT, StructureCrop, image_id, split_by_image, structure_crops
from lib.training.validation import ValidationResult

logger = logging.getLogger(__name__)

STATS_FILE = "train_stats.json"
# The generalist training's loss and click rules (scripts/train_generalist.sh), which a fine-tune keeps.
GENERALIST_CE_WEIGHT = 1.0
GENERALIST_CLICK_MIX = "mixed"


# MONAI Label's own keys in a train request, which are not options of this trainer: the endpoint adds `model`,
# MONAILabelClient adds `client_id`, a bundle app gets `bundle_path`, the training subprocess `local_rank`.
MONAI_LABEL_KEYS = frozenset({"model", "client_id", "bundle_path", "local_rank"})

# Names earlier versions of this trainer used. A script written for them keeps working: it trained with these
# names, and refusing them would break a working set-up for a rename only, while an unknown name is refused
# because it was never honoured. The log says the new name; /info and the README show only the new ones.
DEPRECATED_NAMES = {"epochs": "max_epochs", "batch_size": "train_batch_size"}


class TrainRequest(BaseModel):
    """Options of one training run, named as MONAI Label's BasicTrainTask names them where it has them.

    Slicer and OHIF send back the trainer's `/info` config with the user's edits; an option this trainer does not
    know is refused (HTTP 422 naming it), MONAI Label's own keys (`MONAI_LABEL_KEYS`) pass."""

    model_config = ConfigDict(extra="forbid")

    max_epochs: int = Field(10, ge=1, le=10_000, description="passes over the training crops")
    learning_rate: float = Field(1e-4, gt=0, le=1e-2)
    clicks: int = Field(10, ge=1, le=50, description="simulated clicks K per training sample")
    memory_mode: MemoryMode | None = Field(None, description="memory of the trained weights; default: the served")
    freeze_encoder: bool = Field(True, description="train prompt encoder, decoder and memory only (cached embeddings)")
    val_split: float = Field(0.2, ge=0, lt=1, description="share of labelled images held out for validation")
    train_batch_size: int = Field(2, ge=1, le=64, description="samples per optimiser step (per GPU)")
    crops_per_structure: int = Field(2, ge=1, le=64, description="128^3 crops drawn around each labelled structure")
    # 0 rather than None as "no limit": Slicer shows an option as text and sends it back as typed
    max_minutes: float | None = Field(0, ge=0, description="stop (keeping the best weights so far) after this; 0: none")
    seed: int = Field(0, ge=0, description="the split, the crops and the training's random numbers")
    multi_gpu: bool = Field(True, description="DDP over every visible GPU (or those `gpus` names)")
    gpus: str = Field(
        "all",
        pattern=r"^(all|\d+(,\d+)*)?$",
        description="GPUs to train on: all (or empty), or ids such as 0,1; MONAI Label sets CUDA_VISIBLE_DEVICES",
    )
    device: DeviceName | None = Field(None, description="default: the app's --conf device")

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> TrainRequest:
        """Parse MONAI Label's request; raises HTTPException(422) naming every bad or unknown option."""
        # Slicer sends list-valued options as the chosen element, a REST client may send the list itself
        options = {k: v[0] if isinstance(v, list) and v else v for k, v in request.items() if k not in MONAI_LABEL_KEYS}
        for old, new in DEPRECATED_NAMES.items():
            if old not in options:
                continue
            value = options.pop(old)
            if new in options and options[new] != value:
                raise HTTPException(
                    status_code=422, detail=f"{old} is the old name of {new}: send {new} alone (got both)"
                )
            logger.warning("MAIS training: option %r is deprecated, use %r", old, new)
            options[new] = value
        try:
            return cls.model_validate(options)
        except ValidationError as error:
            raise HTTPException(status_code=422, detail="; ".join(map(_problem, error.errors()))) from None


def _problem(error: dict[str, Any]) -> str:
    name = ".".join(map(str, error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"unknown option {name!r} (the options: {', '.join(TrainRequest.model_fields)})"
    return f"{name}: {error['msg']} (got {error.get('input')!r})"


class MaisTrainer(TrainTask):
    def __init__(self, settings: AppSettings, label_map: dict[str, int], model_loader: ModelLoader):
        super().__init__("MAIS: fine-tune prompt encoder, mask decoder and memory on the final labels")
        self.settings = settings
        self.label_map = label_map
        self.model_loader = model_loader

    def config(self) -> dict[str, Any]:
        """The options Slicer and OHIF show, with their defaults (a list is a choice, its first item the default)."""
        defaults = TrainRequest()
        try:
            served_mode = self.model_loader.get().model.config.memory_mode
        except WeightsError:  # /info must answer while the served file is unusable (clicks get 503 naming it)
            served_mode = MEMORY_MODES[-1]
        modes = [served_mode, *(m for m in reversed(MEMORY_MODES) if m != served_mode)]
        devices = [self.settings.device, *(d for d in DEVICE_NAMES if d != self.settings.device)]
        return {
            "max_epochs": defaults.max_epochs,
            "learning_rate": defaults.learning_rate,
            "clicks": defaults.clicks,
            "memory_mode": modes,
            "freeze_encoder": defaults.freeze_encoder,
            "val_split": defaults.val_split,
            "train_batch_size": defaults.train_batch_size,
            "crops_per_structure": defaults.crops_per_structure,
            "max_minutes": defaults.max_minutes,
            "seed": defaults.seed,
            "multi_gpu": defaults.multi_gpu,
            "gpus": defaults.gpus,
            "device": devices,
        }

    def stats(self) -> dict[str, Any]:
        path = self.settings.train_dir / STATS_FILE
        try:
            stats = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        if stats.get("status") == "running" and not _alive(stats.get("pid", -1)):
            # killed (DELETE /train/, a crash, a reboot): it could not say so itself
            stats["status"] = "stopped before finishing"
        return stats

    def check(self, request: dict[str, Any], datastore: Datastore) -> tuple[TrainRequest, DeviceName, list[dict]]:
        """(options, device, datalist) of a run, or the HTTPException that refuses it before it starts.

        Cheap, so the server calls it too before it starts a `run_sync` run in the background (lib/trainers/
        synchronous.py): a refusal there is the HTTP answer, while an exception in the training process only
        reaches its log."""
        options = TrainRequest.from_request(request)
        # the app's own device setting falls back to the CPU without a GPU, as serving does; a run asking for
        # cuda itself is refused
        device = options.device or (
            "cpu" if self.settings.device == "cuda" and not available_gpus() else self.settings.device
        )
        if device == "cuda" and not available_gpus():
            raise HTTPException(status_code=422, detail="device: 'cuda' asked, but this server sees no GPU")
        datalist = datastore.datalist()
        if not datalist:
            raise HTTPException(status_code=422, detail="no final labels in the datastore: save a label first")
        self._served_config()
        return options, device, datalist

    def _served_config(self) -> MaisConfig:
        """The served model's config, which a run starts from; 503 naming the file while it is unusable."""
        try:
            return self.model_loader.get().model.config
        except WeightsError as error:
            raise HTTPException(status_code=503, detail=f"the served weights cannot be trained from: {error}") from None

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        options, device, datalist = self.check(request, datastore)
        world_size = _world_size(options, device)
        rng = np.random.default_rng(options.seed)
        train_items, val_items = split_by_image(datalist, options.val_split, rng)
        crops = self._crops(train_items, options.crops_per_structure, rng)
        if not crops:
            raise HTTPException(
                status_code=422,
                detail="the final labels hold none of the app's labels "
                f"{sorted(name for name, index in self.label_map.items() if index)}",
            )
        # a single labelled image (or val_split 0) leaves nothing to hold out: validate on the training images.
        # Validation crops are centred on their structure, as the window of a user's first click is.
        held_out = self._crops(val_items, 1, rng, max_shift=0)
        val_crops = held_out or self._crops(train_items, 1, rng, max_shift=0)

        runs_dir = self.settings.train_dir / "runs"
        # A run's checkpoints serve only that run (its best weights until they are published; a run from the web
        # UI or REST cannot be resumed), so none outlive it: a run that published nothing left 147 MB here. One
        # stopped with DELETE /train/ was killed before it could clean up: its folder goes when the next run starts.
        shutil.rmtree(runs_dir, ignore_errors=True)
        run_dir = runs_dir / time.strftime("%Y%m%d-%H%M%S")
        steps_per_epoch = math.ceil(len(crops) / (options.train_batch_size * world_size))
        init = self.model_loader.path
        served = self._served_config()
        config = FitConfig(
            out=run_dir / "last.pt",
            init=init,
            memory_mode=options.memory_mode or served.memory_mode,
            memory_size=served.memory_size,
            prompt_clicks=served.prompt_clicks,
            steps=options.max_epochs * steps_per_epoch,
            batch_size=options.train_batch_size,
            lr=options.learning_rate,
            warmup_steps=steps_per_epoch,
            clicks=options.clicks,
            # the loss and clicks the shipped weights were trained with (scripts/train_generalist.sh): with the Dice
            # alone and uniform error clicks, a fine-tune on Colin27's amygdala reached a validation score of 0.614
            # instead of 0.663, and the newer generalist weights got worse clicks than before it
            ce_weight=GENERALIST_CE_WEIGHT,
            click_mix=GENERALIST_CLICK_MIX,
            freeze_encoder=options.freeze_encoder,
            # validated on the very crops it trains on, the best-scoring epoch is chosen by noise: fine-tuned on
            # Colin27's amygdala drawn with the hippocampus (tests/test_train.py), the best epoch (2 of 6) then
            # served worse clicks than the last on both amygdalae (mean Dice of clicks 1-5: 0.597 against 0.624)
            keep_weights="best" if held_out else "latest",
            synthetic_fraction=0.0,
            seed=options.seed,
            time_budget_s=options.max_minutes * 60 if options.max_minutes else None,
            device="cpu" if device == "cpu" else "auto",
            log_every=steps_per_epoch,
            checkpoint_every=steps_per_epoch,
            validate_every=steps_per_epoch,
        )
        progress = TrainingProgress(
            stats_path=self.settings.train_dir / STATS_FILE,
            steps_per_epoch=steps_per_epoch,
            stats={
                "status": "running",
                "pid": os.getpid(),
                "start_ts": int(time.time()),
                "init_weights": str(init),
                "train_images": sorted(_image_id(item) for item in train_items),
                "val_images": sorted(_image_id(item) for item in val_items),
                "train_crops": len(crops),
                "val_crops": len(val_crops),
                "max_epochs": options.max_epochs,
                "steps_per_epoch": steps_per_epoch,
                "gpus": world_size,
                "options": options.model_dump(),
                "history": [],
            },
        )
        logger.info(
            "MAIS training: %d training image(s) %s, %d validation image(s) %s, %d + %d crops, %d epoch(s) x %d "
            "step(s) on %d process(es)",
            len(train_items),
            progress.stats["train_images"],
            len(val_items),
            progress.stats["val_images"],
            len(crops),
            len(val_crops),
            options.max_epochs,
            steps_per_epoch,
            world_size,
        )
        progress.write()
        try:
            if world_size > 1:
                result = fit_distributed(config, world_size, crops, val_crops, progress.on_log, progress.on_validation)
            else:
                result = fit(config, crops, val_crops, progress.on_log, progress.on_validation)
            published = self._publish(result, config)
        except Exception as error:
            progress.fail(error)
            raise
        finally:
            shutil.rmtree(run_dir, ignore_errors=True)
        return progress.finish(result, published)

    def _crops(
        self, items: list[dict], crops_per_structure: int, rng: np.random.Generator, max_shift: int = MAX_CROP_SHIFT
    ) -> list[StructureCrop]:
        crops = []
        for item in items:
            crops += structure_crops(
                item["image"], item["label"], self.label_map, rng, crops_per_structure, max_shift=max_shift
            )
        return crops

    def _publish(self, result: FitResult, config: FitConfig) -> Path | None:
        """Copy the best weights over the served file atomically, if any beat the served weights on validation."""
        if result.best_step == 0:
            logger.info("MAIS training: no epoch beat the served weights on validation; nothing published")
            return None
        target = self.settings.trained_weights
        with open(config.best_path, "rb") as best:  # the infer task sees the old file or the new one, never part
            atomic_write(target, lambda f: shutil.copyfileobj(best, f))
        logger.info("MAIS training: published the weights of step %d to %s", result.best_step, target)
        return target


class TrainingProgress:
    """Per-epoch log lines (which `/train` status shows) and `train_stats.json` (which `/info` shows).

    Picklable (plain fields, bound methods as callbacks), so DDP's rank-0 process can report too."""

    def __init__(self, stats_path: Path, steps_per_epoch: int, stats: dict[str, Any]):
        self.stats_path = stats_path
        self.steps_per_epoch = steps_per_epoch
        self.stats = stats

    def on_log(self, log: TrainingLog) -> None:
        epoch = self._epoch(log.step)
        train_dice = " ".join(f"dice@{k} {v:.3f}" for k, v in log.dice_at_click.items())
        logger.info(
            "epoch %d/%d: loss %.4f, training %s, %.2f samples/s",
            epoch,
            self.stats["max_epochs"],
            log.loss,
            train_dice,
            log.samples_per_s,
        )
        self._record(epoch, loss=round(log.loss, 5), samples_per_s=round(log.samples_per_s, 3))

    def on_validation(self, result: ValidationResult) -> None:
        epoch = self._epoch(result.step)
        dice = {f"dice@{k}": round(v, 4) for k, v in result.dice_at(LOGGED_CLICKS).items()}
        logger.info(
            "epoch %d/%d: validation %s (score %.4f)",
            epoch,
            self.stats["max_epochs"],
            " ".join(f"{k} {v:.3f}" for k, v in dice.items()),
            result.score,
        )
        self._record(epoch, validation={**dice, "score": round(result.score, 5)})

    def finish(self, result: FitResult, published: Path | None) -> dict[str, Any]:
        self.stats.update(
            status="done" if result.finished else "stopped by max_minutes",
            end_ts=int(time.time()),
            steps_done=result.steps_done,
            best_epoch=self._epoch(result.best_step) if result.best_step else None,
            published=str(published) if published else None,
            samples_per_s=round(result.samples_per_s, 3),
        )
        self.write()
        return self.stats

    def fail(self, error: Exception) -> None:
        self.stats.update(status=f"failed: {error}", end_ts=int(time.time()))
        self.write()

    def write(self) -> None:
        """Atomically, so `/info` never reads a half-written file."""
        atomic_write(self.stats_path, lambda f: f.write(json.dumps(self.stats, indent=1).encode()))

    def _epoch(self, step: int) -> int:
        return math.ceil(step / self.steps_per_epoch)

    def _record(self, epoch: int, **values) -> None:
        history = self.stats["history"]
        if not history or history[-1]["epoch"] != epoch:
            history.append({"epoch": epoch})
        history[-1].update(values)
        self.write()


def _world_size(options: TrainRequest, device: str) -> int:
    """Training processes: one per GPU that `multi_gpu` and `gpus` allow, one on the CPU.

    A run the server starts (run_sync or not) never sees a list in `gpus`: MONAI Label turns it into
    CUDA_VISIBLE_DEVICES for the training process and sends "all". A list reaches the trainer only when it is
    called in a process that sees all GPUs, where process r trains on cuda:r: so the list must be the first GPUs,
    0,1,...,n-1."""
    visible = available_gpus()
    if device == "cpu" or not visible:
        return 1
    if options.gpus in ("all", ""):
        wanted = visible
    else:
        ids = [int(i) for i in options.gpus.split(",")]
        if ids != list(range(len(ids))) or len(ids) > visible:
            raise HTTPException(
                status_code=422,
                detail=f"gpus: {options.gpus!r} must be the first of the {visible} visible GPU(s) (0,1,...) "
                "outside MONAI Label's training process; start the run through the server to pick others",
            )
        wanted = len(ids)
    return wanted if options.multi_gpu else 1


def _alive(pid: int) -> bool:
    """Whether process `pid` still runs (a killed one stays a zombie until MONAI Label reaps it)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _image_id(item: dict) -> str:
    """The datastore id of a datalist item (a local image name, or a DICOMweb SeriesInstanceUID)."""
    return image_id(item["image"])
