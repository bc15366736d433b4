"""The studies-folder datastore (`--studies <folder>`), refusing an upload MAIS could not segment.

Why: MONAI Label's `PUT /datastore/image` stores whatever file it gets. A corrupt, 2D, 4D or NaN/Inf image then
sits in the datastore, Next Sample hands it to an annotator, and it fails only at the first click. This subclass
reads the upload with `load_volume`, the check every click goes through, and answers HTTP 422 with its message
before anything is stored.
"""

from __future__ import annotations

import os
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from lib.imaging import VolumeError, load_volume


class MaisLocalDatastore(LocalDatastore):
    @classmethod
    def adopt(cls, datastore: LocalDatastore) -> MaisLocalDatastore:
        """Turn the datastore MONAI Label built into this class: it keeps MONAI Label's settings (extensions,
        auto reload, read-only) and its file watcher, and builds no second index."""
        datastore.__class__ = cls
        return datastore

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            load_volume(image_filename)
        except VolumeError as error:
            # The file is the endpoint's temporary copy of the upload (the endpoint is this method's only caller).
            # MONAI Label deletes it in a background task, which FastAPI does not run when the endpoint raises.
            os.unlink(image_filename)
            raise HTTPException(status_code=422, detail=f"image {image_id!r} not added: {error}") from None
        return super().add_image(image_id, image_filename, image_info)
