"""`fit` on several GPUs of one machine: one process per GPU, torch DDP over NCCL (gloo on the CPU, for tests).

Each process runs the same `fit` (lib.training.loop): it draws its own samples, DDP averages the gradients, and
rank 0 alone validates, logs and writes files. Processes are started with torch.multiprocessing.spawn, so the
training data (crops) reach them pickled (tensors through shared memory) and callbacks must be picklable.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lib.devices import resolve_device
from lib.training.config import FitConfig
from lib.training.loop import FitResult, fit
from lib.training.progress import TrainingLog
from lib.training.real_data import StructureCrop
from lib.training.validation import ValidationResult

# Rank 0 validates while the others wait at their next gradient exchange: generous, not NCCL's default 10 min.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def available_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def fit_distributed(
    config: FitConfig,
    world_size: int,
    crops: Sequence[StructureCrop] = (),
    val_crops: Sequence[StructureCrop] = (),
    on_log: Callable[[TrainingLog], None] | None = None,
    on_validation: Callable[[ValidationResult], None] | None = None,
) -> FitResult:
    """Run `fit` in `world_size` processes under DDP and return rank 0's FitResult.

    When config.device resolves to CUDA ("auto" with a GPU visible, "cuda") process r trains on cuda:r over NCCL;
    otherwise every process trains on the CPU over gloo. `config.batch_size` is per process: the effective batch
    is world_size times larger.
    """
    if world_size < 2:
        raise ValueError(f"fit_distributed needs world_size >= 2, got {world_size}; call fit for one process")
    use_cuda = resolve_device(config.device).type == "cuda"
    if use_cuda and world_size > available_gpus():
        raise ValueError(f"{world_size} processes asked for, {available_gpus()} GPU(s) visible")
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(
        _worker,
        args=(world_size, _free_port(), use_cuda, config, list(crops), list(val_crops), on_log, on_validation, results),
        nprocs=world_size,
        join=True,
    )
    return results.get()


def _worker(
    rank: int,
    world_size: int,
    port: int,
    use_cuda: bool,
    config: FitConfig,
    crops,
    val_crops,
    on_log,
    on_validation,
    results,
) -> None:
    if not logging.getLogger().handlers:  # a spawned process starts without the parent's logging set-up
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=PROCESS_GROUP_TIMEOUT,
    )
    try:
        if use_cuda:
            torch.cuda.set_device(rank)
        device = f"cuda:{rank}" if use_cuda else "cpu"
        is_main = rank == 0
        result = fit(
            config.replace(device=device),
            crops,
            val_crops,
            on_log if is_main else None,
            on_validation if is_main else None,
        )
        if is_main:
            results.put(result)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
