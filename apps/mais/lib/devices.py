"""Which torch device a device option names. Importing it does not import torch (the app's settings use the names)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    import torch

# What a user may set as the device of the app (--conf device) or of one training run.
DeviceName = Literal["auto", "cuda", "cpu"]
DEVICE_NAMES: tuple[str, ...] = get_args(DeviceName)


def resolve_device(name: str = "auto") -> torch.device:
    """ "auto": the GPU when one is visible, else the CPU; any other name as torch reads it ("cpu", "cuda:1")."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def copy_to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A new host tensor copied to `device` without waiting for the GPU: a copy from pageable memory waits for
    every kernel queued before it, one from pinned memory does not (the caching host allocator keeps the pinned
    block until the copy is done). The training's data is drawn this way while the GPU runs the step before."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
