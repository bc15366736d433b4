"""The MAIS weights file: save, read and load, and the checks that name what is wrong with a file.

    save_mais(model, "mais.pt", metadata={"trained_on": "..."})
    model = load_mais("mais.pt", device="cpu", memory_mode=None)  # the network comes from the file

Format ("mais", written atomically, readable with torch.load(weights_only=True)):
    {"format": "mais", "format_version": 1, "config": MaisConfig.to_dict(), "model_state_dict": {...},
     "metadata": {...}}

Every loading error is a WeightsError (a ValueError) whose message names the file and, for a key problem, the key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lib.atomic_file import atomic_torch_save

from .builder import build_mais
from .config import MaisConfig
from .mais import Mais

logger = logging.getLogger(__name__)

FORMAT = "mais"
FORMAT_VERSION = 1


class WeightsError(ValueError):
    """A weights file or state dict that cannot be loaded; the message says which file / key and why."""


def save_mais(
    model: Mais,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    storage_dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (config, weights, metadata) to `path` atomically (lib.atomic_file), so a reader never sees a
    half-written file. metadata: plain values (str, numbers, lists, dicts). storage_dtype: e.g. torch.float16
    halves the file (shipped weights); `load_mais` casts back to the model's."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model_state_dict": state,
        "metadata": dict(metadata or {}),
    }
    atomic_torch_save(payload, path)
    logger.info("saved MAIS model (%s, memory %s) to %s", model.config.name, model.config.memory_mode, path)
    return path


def read_mais_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checked payload of a MAIS weights file (format, config, model_state_dict, metadata)."""
    payload = read_torch_file(path, trusted=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        hint = " (an official SAM-Med3D checkpoint? use load_sam_med3d_checkpoint)" if is_sam_med3d(payload) else ""
        raise WeightsError(f"{path}: not a MAIS weights file (format {found!r}, expected {FORMAT!r}){hint}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            f"{path}: MAIS format version {payload.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    for key in ("config", "model_state_dict"):
        if not isinstance(payload.get(key), Mapping):
            raise WeightsError(f"{path}: MAIS weights file has no {key!r} dict")
    return payload


def load_mais(path: str | os.PathLike, device: torch.device | str = "cpu", memory_mode: str | None = None) -> Mais:
    """Build the model the file describes and load its weights strictly; eval mode, on `device`.

    memory_mode: None keeps the file's; any of "none", "sparse", "dense", "both" overrides it (every mode has the
    same weights). Raises WeightsError for a missing file, a file torch cannot read, another format, or a missing,
    unexpected or misshapen key (named).
    """
    payload = read_mais_file(path)
    try:
        config = MaisConfig.from_dict(payload["config"])
        if memory_mode is not None:
            config = dataclasses.replace(config, memory_mode=memory_mode)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from e
    model = build_mais(config, device="meta")
    expected = model.state_dict()
    check_state_dict(expected, payload["model_state_dict"], source=str(path))
    # weights stored in a smaller dtype (save_mais storage_dtype) come back in the model's own
    state = {k: v.to(expected[k].dtype) for k, v in payload["model_state_dict"].items()}
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded MAIS model (%s, memory %s) from %s", config.name, config.memory_mode, path)
    return model.to(device).eval()


def check_state_dict(expected: Mapping[str, Tensor], state: Mapping[str, Any], source: str) -> None:
    """Raise WeightsError naming the first missing, unexpected or misshapen key of `state` against `expected`."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise WeightsError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for k, ref in expected.items():
        value = state[k]
        if not isinstance(value, Tensor):
            raise WeightsError(f"{source}: key {k!r} holds a {type(value).__name__}, not a tensor")
        if value.shape != ref.shape:
            raise WeightsError(
                f"{source}: key {k!r} has shape {tuple(value.shape)}, the model expects {tuple(ref.shape)}"
            )


def is_sam_med3d(payload: Any) -> bool:
    """Whether a loaded file holds an official SAM-Med3D state dict (its own or under "model_state_dict")."""
    if not isinstance(payload, Mapping):
        return False
    state = payload.get("model_state_dict", payload)
    return isinstance(state, Mapping) and any(str(k).removeprefix("module.").startswith("mask_decoder.") for k in state)


def read_torch_file(path: str | os.PathLike, trusted: bool) -> Any:
    """torch.load on the CPU; tensors only unless `trusted`. Every failure is a WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # torch's unpickler raises many types on a damaged or foreign file
        # torch.save writes a zip archive; a weights_only refusal inside one means pickled non-tensor objects
        if isinstance(e, pickle.UnpicklingError) and not trusted and zipfile.is_zipfile(path):
            raise WeightsError(
                f"{path}: holds pickled objects other than tensors; load it with trusted=True only if you trust its "
                f"source ({str(e).splitlines()[0]})"
            ) from e
        raise WeightsError(
            f"{path}: not a readable torch weights file (damaged or another format; {type(e).__name__})"
        ) from e
