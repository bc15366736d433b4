"""The DICOMweb datastore (`--studies http://<pacs>/dicom-web`) with final labels stored as DICOM SEG by pydicom-seg.

Why: MONAI Label's `DICOMWebDatastore.save_label` converts a final label to DICOM SEG with dcmqi's
`itkimage2segimage`, a binary it downloads from GitHub at start. It is not in Debian and this app never downloads,
so the stock path fails. MONAI Label ships a second converter, `nifti_to_dicom_seg(..., use_itk=False)`
(pydicom-seg, already a MONAI Label dependency); this subclass uses it and checks the label first, so that a
label that does not fit the series is answered with HTTP 422 instead of a 500 or a SEG on the wrong grid.

What changes against the stock datastore:
- `save_label` with tag `final`: the label (NIfTI, NRRD, or OHIF's raw `.bin` buffer) must lie on the series'
  own grid (size, origin, spacing, direction) and hold only indices of the app's label map; each index becomes
  one segment named after its label. The SEG is uploaded with STOW-RS and the label kept in the local cache as
  `.nii.gz`. Other tags are the stock behaviour (cache only).
- `list_images` leaves SEG series out: with a search filter that lists every modality (`{}`, needed for MR),
  the stock datastore would count the saved SEGs as images and hand them out as the next sample.
- `get_labeled_images` lists a series once, however many SEGs refer to it (saving again adds a SEG), and after a
  save its cached answer is dropped, so `/datastore` stats and the active-learning strategies see the new label
  at once (MONAI Label caches it for 2 hours).

Training reads labels through the stock `datalist()`: it lists the PACS' SEG series, follows each one's
ReferencedSeriesSequence to its image series, and uses the cached label of that series if this server saved it,
else downloads the SEG and decodes it with pydicom-seg. SEGs whose image series the search filter does not list
are ignored.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import numpy as np
import requests
import SimpleITK as sitk
from cachetools import TTLCache, cached
from fastapi import HTTPException
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
from monailabel.datastore.utils.convert import binary_to_image, nifti_to_dicom_seg
from monailabel.datastore.utils.dicom import dicom_web_upload_dcm
from monailabel.interfaces.datastore import DefaultLabelTag
from pydicom.dataset import Dataset

logger = logging.getLogger(__name__)

# How far a label's grid may be off the series' grid and still count as the same (float round trips of NIfTI,
# NRRD and DICOM headers stay far below these).
ORIGIN_TOLERANCE = 0.01  # share of the smallest voxel spacing
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3


class MaisDICOMWebDatastore(DICOMWebDatastore):
    label_map: dict[str, int]

    @classmethod
    def adopt(cls, datastore: DICOMWebDatastore, label_map: dict[str, int]) -> MaisDICOMWebDatastore:
        """Turn the datastore MONAI Label built into this class. MONAI Label sets up the DICOMweb client
        (credentials, Google Cloud sessions, URL prefixes, cache folder) inside `_init_dicomweb_datastore`;
        adopting its object reuses all of that, and builds no second cache index or file watcher."""
        datastore.__class__ = cls
        datastore.label_map = dict(label_map)
        return datastore

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def list_images(self) -> list[str]:
        datasets = [Dataset.from_json(ds) for ds in self._client.search_for_series(search_filters=self._search_filter)]
        return [str(ds.SeriesInstanceUID) for ds in datasets if ds.get("Modality") != "SEG"]

    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Each labelled series once: every save stores a new SEG, and the stock answer lists a series per SEG."""
        return sorted(set(super().get_labeled_images(label_tag, labels)))

    def save_label(
        self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], label_id: str = ""
    ) -> str:
        if label_tag != DefaultLabelTag.FINAL:
            return super().save_label(image_id, label_filename, label_tag, label_info, label_id)
        if not self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id}):
            raise HTTPException(status_code=404, detail=f"series {image_id!r} is not in the PACS")

        image_uri = self.get_image_uri(image_id)  # downloads the series into the cache if needed
        series = sitk.ImageFileReader()
        series.SetFileName(image_uri)
        series.ReadImageInformation()
        label = _read_label(label_filename, image_uri, series)
        _check_same_grid(label, series)
        values = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v != 0]
        segments = self._segments(values)

        with tempfile.TemporaryDirectory(prefix="mais-seg-") as tmp:
            label_file = os.path.join(tmp, f"{image_id}.nii.gz")
            sitk.WriteImage(label, label_file, True)
            image_dir = os.path.realpath(os.path.join(self._datastore.image_path(), image_id))
            seg_file = nifti_to_dicom_seg(image_dir, label_file, segments, use_itk=False)
            try:
                seg_series_id = dicom_web_upload_dcm(seg_file, self._client)
            except requests.HTTPError as error:
                raise HTTPException(status_code=502, detail=f"the PACS refused the DICOM SEG: {error}") from None
            finally:
                os.unlink(seg_file)
            image_info = self.get_image_info(image_id)
            label_info = {
                **(label_info or {}),
                "SeriesInstanceUID": seg_series_id,
                "segments": {str(v): s["name"] for v, s in zip(values, segments)},
                **{k: image_info.get(k) for k in ("Modality", "PatientID", "StudyInstanceUID")},
            }
            # the stock save minus its dcmqi conversion: keep the label in the local cache, as .nii.gz, which is
            # the name the stock datalist() looks for before it would download and decode the SEG again
            saved = LocalDatastore.save_label(self, image_id, label_file, label_tag, label_info)
        DICOMWebDatastore.get_labeled_images.cache_clear()
        logger.info("final label of series %s stored in the PACS as SEG series %s", image_id, seg_series_id)
        return saved

    def _segments(self, values: list[int]) -> list[dict[str, Any]]:
        """`nifti_to_dicom_seg`'s label_info: one entry per label value present, in ascending order."""
        names = {index: name for name, index in self.label_map.items() if index}
        if not values:
            raise HTTPException(status_code=422, detail="the label is empty: a DICOM SEG needs at least one segment")
        unknown = [v for v in values if v not in names]
        if unknown:
            raise HTTPException(
                status_code=422,
                detail=f"label values {unknown} are not in the app's label map {dict(sorted(names.items()))}",
            )
        return [_segment(v, names[v]) for v in values]


def _segment(index: int, name: str) -> dict[str, Any]:
    """A DICOM SEG segment description. The type is coded in a private scheme (99MAIS, code = label index): the
    app's labels have no standard code, and MONAI Label's default (SNOMED 78961009, spleen) would mislabel them."""
    return {
        "name": name,
        "model_name": "MAIS",
        "segmentAttribute": {
            "labelID": index,
            "SegmentLabel": name,
            "SegmentDescription": name,
            "SegmentAlgorithmType": "SEMIAUTOMATIC",
            "SegmentAlgorithmName": "MAIS",
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": "123037004",
                "CodingSchemeDesignator": "SCT",
                "CodeMeaning": "Anatomical Structure",
            },
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": str(index),
                "CodingSchemeDesignator": "99MAIS",
                "CodeMeaning": name,
            },
            "recommendedDisplayRGBValue": [int(c) for c in GENERIC_ANATOMY_COLORS.get(name, (255, 0, 0))[:3]],
        },
    }


def _read_label(label_filename: str, image_uri: str, series: sitk.ImageFileReader) -> sitk.Image:
    """The label as an unsigned integer image; OHIF's `.bin` (one uint8 per voxel, x fastest) is put on the
    series' grid first, as MONAI Label does."""
    if label_filename.endswith(".bin"):
        expected = int(np.prod(series.GetSize()))
        got = os.path.getsize(label_filename)
        if got != expected:
            raise HTTPException(
                status_code=422,
                detail=f"a .bin label must hold one uint8 per voxel of the series {series.GetSize()}: "
                f"expected {expected} bytes, got {got}",
            )
        converted = binary_to_image(image_uri, label_filename)
        try:
            return _read_label(converted, image_uri, series)
        finally:
            os.unlink(converted)
    try:
        label = sitk.ReadImage(label_filename)
    except RuntimeError as error:
        raise HTTPException(status_code=422, detail=f"the label is not a readable image file: {error}") from None
    if label.GetDimension() != 3 or label.GetNumberOfComponentsPerPixel() != 1:
        raise HTTPException(
            status_code=422,
            detail=f"the label must be a 3D single-component image, got {label.GetDimension()}D with "
            f"{label.GetNumberOfComponentsPerPixel()} component(s)",
        )
    array = sitk.GetArrayViewFromImage(label)
    if array.min() < 0 or array.max() > np.iinfo(np.uint16).max or not np.all(np.mod(array, 1) == 0):
        raise HTTPException(status_code=422, detail="label values must be non-negative integers (label indices)")
    return sitk.Cast(label, sitk.sitkUInt16)


def _check_same_grid(label: sitk.Image, series: sitk.ImageFileReader) -> None:
    """422 unless the label lies voxel for voxel on the series' grid (a SEG's frames are the series' slices)."""
    problems = []
    if label.GetSize() != series.GetSize():
        problems.append(f"size {label.GetSize()} != {series.GetSize()}")
    else:
        spacing = np.array(series.GetSpacing())
        if not np.allclose(label.GetSpacing(), spacing, rtol=SPACING_RTOL, atol=0):
            problems.append(f"spacing {label.GetSpacing()} != {series.GetSpacing()}")
        if not np.allclose(label.GetOrigin(), series.GetOrigin(), atol=ORIGIN_TOLERANCE * spacing.min(), rtol=0):
            problems.append(f"origin {label.GetOrigin()} != {series.GetOrigin()}")
        if not np.allclose(label.GetDirection(), series.GetDirection(), atol=DIRECTION_ATOL, rtol=0):
            problems.append(f"direction {label.GetDirection()} != {series.GetDirection()}")
    if problems:
        raise HTTPException(
            status_code=422,
            detail=f"the label is not on the series' grid (LPS, mm): {'; '.join(problems)}. "
            "Save the mask on the series' own grid, as /infer returns it.",
        )
