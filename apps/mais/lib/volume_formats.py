"""The volume file formats the app reads and writes, and the voxel types a result may be written in: one list
each, for the request schema, the result writer, the datastore ids and the start-up check."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

# NRRD (Slicer's own) first: the order request errors list them in
VolumeExtension = Literal[".nrrd", ".nii.gz", ".nii"]
VOLUME_EXTENSIONS: tuple[str, ...] = get_args(VolumeExtension)
# numpy dtype names a result label may be written in (`result_dtype`)
ResultDtype = Literal["uint8", "uint16", "int16", "int32", "float32"]


def volume_extension(path: str | Path) -> str | None:
    """The volume extension `path` ends with (".nii.gz", not ".gz"), or None."""
    name = Path(path).name
    return next((ext for ext in VOLUME_EXTENSIONS if name.endswith(ext)), None)
