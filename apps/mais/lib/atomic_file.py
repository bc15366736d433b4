"""Atomic file writing: a reader (the server reloading published weights, /info reading training stats, a resumed
training run) sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """write(file) into a temporary file of the same folder, then os.replace over `path`. The folder is created
    if needed; the temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(payload, f))
