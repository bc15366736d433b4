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
- One SEG counts per image series, the newest: saving again adds a SEG and leaves the older ones in the PACS
  (nothing is deleted from a hospital's archive), and the stock datastore then trained on whichever SEG it decoded
  last in the PACS' listing. `_newest_segs` is the one rule, used by the training `datalist()`, by the label
  download (GET /datastore/label, a final label's id being its image's SeriesInstanceUID) and by
  `get_labeled_images`: the SEG with the latest ContentDate/ContentTime (pydicom-seg writes the time of writing to
  the microsecond), the SeriesInstanceUID settling a tie the same way on every server.
- The local cache keeps one label per series, `<series>.nii.gz`, with the SEG it came from as its
  `SeriesInstanceUID` (shown by GET /datastore/?output=all); it is decoded again only when a newer SEG appears.
- `get_labeled_images` lists a series once, however many SEGs refer to it, and after a save its cached answer is
  dropped, so `/datastore` stats and the active-learning strategies see the new label at once (MONAI Label caches
  it for 2 hours).
- `get_image_info` puts the series' study fields (StudyInstanceUID, PatientID, Modality, ...) back into its cached
  record where the record has lost them. A training or scoring run is a process of its own with its own view of
  the cache; one that finds a fetched series' NIfTI on disk before its record (LocalDatastore's reconcile) writes a
  bare record over the shared datastore file, which the server then reloads, and Next Sample answered without
  the StudyInstanceUID that OHIF opens the sample's study by.
- No request leaves files in the temporary folder: the stock series conversion and SEG decode wrote a file there
  per series or label and never deleted it.

SEGs whose image series the search filter does not list are ignored, as in the stock datastore.
"""

from __future__ import annotations

import logging
import os
import tempfile
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import pydicom
import pydicom_seg
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
from pydicom.valuerep import DA, TM

logger = logging.getLogger(__name__)

# How far a label's grid may be off the series' grid and still count as the same (float round trips of NIfTI,
# NRRD and DICOM headers stay far below these).
ORIGIN_TOLERANCE = 0.01  # share of the smallest voxel spacing
SPACING_RTOL = 1e-3
DIRECTION_ATOL = 1e-3

# Where a SEG's time of creation is read, in order: ContentDate/Time is the creation of its content (what a new
# save changes); the others stand in for writers that leave it out.
CREATION_TAGS = (
    ("ContentDate", "ContentTime"),
    ("InstanceCreationDate", "InstanceCreationTime"),
    ("SeriesDate", "SeriesTime"),
)


class SegRef(NamedTuple):
    """A SEG series in the PACS, and when it was created (datetime.min when it does not say). Fields in the order
    of `_newest_segs`' comparison: the latest creation wins, the greater SeriesInstanceUID settles a tie."""

    created: datetime
    series_uid: str
    study_uid: str


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

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """The cached record's info, with the PACS's study fields put back (and stored) where another process of
        the server wrote a record without them (module docstring); {} for a series not fetched yet, as stock."""
        info = super().get_image_info(image_id)
        if info and "StudyInstanceUID" not in info:
            try:
                study_fields = self._dicom_info(image_id)
            except IndexError:  # the PACS no longer has the series: the record is what there is
                return info
            self.update_image_info(image_id, study_fields)
            info.update(study_fields)
        return info

    @cached(cache=TTLCache(maxsize=16, ttl=settings.MONAI_LABEL_DICOMWEB_CACHE_EXPIRY))
    def get_labeled_images(self, label_tag: str | None = None, labels: list[str] | None = None) -> list[str]:
        """Each labelled series once: every save stores a new SEG, and the stock answer lists a series per SEG."""
        return sorted(self._newest_segs())

    def get_image_uri(self, image_id: str) -> str:
        uri = super().get_image_uri(image_id)
        if not self._convert_to_nifti:
            return uri  # the downloaded series folder, in the cache
        cached = os.path.realpath(os.path.join(self._datastore.image_path(), f"{image_id}.nii.gz"))
        if uri != cached:
            # the stock conversion wrote the series' NIfTI into the temporary folder, copied it into the cache and
            # returned the temporary one, which nobody deleted
            os.unlink(uri)
        return cached

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """A final label's id is its image's SeriesInstanceUID (LocalDatastore's ids, which /datastore and the
        save answer show); its file is the newest SEG of that series, "" when the series has none."""
        if label_tag != DefaultLabelTag.FINAL:
            return super().get_label_uri(label_id, label_tag)
        image_id = image_id or label_id
        found = self._client.search_for_series(search_filters={"SeriesInstanceUID": image_id})
        if not found:
            return ""
        seg = self._newest_segs(str(Dataset.from_json(found[0]).StudyInstanceUID)).get(image_id)
        return self._cached_label(image_id, seg) if seg else ""

    def datalist(self, full_path: bool = True) -> list[dict[str, Any]]:
        """The training pairs: each labelled series with its newest SEG's label. Labels cached for series that no
        longer have a SEG in the PACS are dropped, as the stock datalist does."""
        newest = self._newest_segs()
        stale = set(LocalDatastore.get_labeled_images(self)) - set(newest)
        for image_id in stale:
            logger.info("series %s has no SEG in the PACS any more: its cached label is removed", image_id)
            LocalDatastore.remove_label(self, image_id, DefaultLabelTag.FINAL)
        if stale:
            self.refresh()  # out of the cache index now, not once the file watcher gets to the deleted files
        for image_id, seg in newest.items():
            self._cached_label(image_id, seg)
        return LocalDatastore.datalist(self, full_path)

    def _newest_segs(self, study_uid: str | None = None) -> dict[str, SegRef]:
        """{image SeriesInstanceUID: its newest SEG} over the SEGs of the PACS (of one study if given) whose
        referenced series the search filter lists. The one place that decides which of several SEGs counts."""
        search = {"Modality": "SEG", **({"StudyInstanceUID": study_uid} if study_uid else {})}
        images = set(self.list_images())
        newest: dict[str, SegRef] = {}
        for found in self._client.search_for_series(search_filters=search):
            series = Dataset.from_json(found)
            seg_study, seg_uid = str(series.StudyInstanceUID), str(series.SeriesInstanceUID)
            meta = Dataset.from_json(self._client.retrieve_series_metadata(seg_study, seg_uid)[0])
            referenced = meta.get("ReferencedSeriesSequence")
            image_id = str(referenced[0].SeriesInstanceUID) if referenced else None
            if image_id not in images:
                logger.warning("SEG series %s ignored: it refers to no series the search filter lists", seg_uid)
                continue
            seg = SegRef(_created(meta), seg_uid, seg_study)
            if image_id not in newest or seg > newest[image_id]:
                newest[image_id] = seg
        return newest

    def _cached_label(self, image_id: str, seg: SegRef) -> str:
        """The cached label file of the series: decoded from `seg` unless the cache already holds that SEG's."""
        cached = LocalDatastore.get_label_uri(self, image_id, DefaultLabelTag.FINAL)
        info = LocalDatastore.get_label_info(self, image_id, DefaultLabelTag.FINAL)
        if cached and os.path.isfile(cached) and info.get("SeriesInstanceUID") == seg.series_uid:
            return cached
        self.get_image_uri(image_id)  # a label is cached beside its image: LocalDatastore refuses one without
        dataset = self._client.retrieve_series(seg.study_uid, seg.series_uid)[0]
        label = pydicom_seg.MultiClassReader().read(dataset).image
        with tempfile.TemporaryDirectory(prefix="mais-seg-") as tmp:
            label_file = os.path.join(tmp, f"{image_id}.nii.gz")
            sitk.WriteImage(label, label_file, True)
            info = {"SeriesInstanceUID": seg.series_uid, "StudyInstanceUID": seg.study_uid}
            LocalDatastore.save_label(self, image_id, label_file, DefaultLabelTag.FINAL, info)
        logger.info("label of series %s decoded from its newest SEG, series %s", image_id, seg.series_uid)
        return LocalDatastore.get_label_uri(self, image_id, DefaultLabelTag.FINAL)

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
        MaisDICOMWebDatastore.get_labeled_images.cache_clear()
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


def _created(meta: pydicom.Dataset) -> datetime:
    """When a SEG was created, from the first of CREATION_TAGS it carries a valid date for (time missing: 00:00)."""
    for date_tag, time_tag in CREATION_TAGS:
        try:
            date, time = DA(meta.get(date_tag)), TM(meta.get(time_tag))
        except ValueError:
            continue
        if date:
            return datetime.combine(date, time or datetime.min.time())
    return datetime.min


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
