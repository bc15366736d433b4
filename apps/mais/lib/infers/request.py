"""The request shapes 3D Slicer, OHIF and scripts send to `/infer/mais`, validated with one pydantic schema each.

MONAI Label merges the JSON `params` into the request dict at top level, beside its own keys (`model`, `image`,
`device`, ...) and the task's config options, so every schema ignores keys it does not know. Click lists are
full histories: every request carries all clicks placed so far for the segment.

- Slicer, DeepEdit type: `{<every label>: [[i, j, k], ...], "label": <current segment>, "client_id": ...}`;
  negative clicks are the points of the `background` segment.
- OHIF v3, DeepEdit type: the same label-keyed lists, no `label` key and no client id: the target is the label
  whose list received the newest click (the caller resolves it against the stored sessions, see
  `parse_click_request`).
- DeepGrow type (Slicer, scripts): `{"foreground": [...], "background": [...], "label": <optional>}`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, TypeAdapter, ValidationError

from lib.volume_formats import ResultDtype, VolumeExtension

ANONYMOUS = "anonymous"  # the client of a request without client_id (OHIF sends none)
MAX_CLICKS = 1000  # per request; a real annotation needs tens. More is a client bug or abuse.

VoxelIndex = Annotated[StrictInt, Field(ge=0)]
Point = Annotated[list[VoxelIndex], Field(min_length=3, max_length=3)]
PointList = Annotated[list[Point], Field(max_length=MAX_CLICKS)]
_POINT_LIST = TypeAdapter(PointList)


class RequestError(ValueError):
    """A request the task refuses; `field` names the offending parameter. Answered with HTTP 422."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class ClickRequest:
    """A validated request, whatever client shape it came in.

    positives / negatives: [[i, j, k], ...] voxel indices of the original image, in the order the client lists
    them (arrival order within each list).
    """

    label: str
    positives: tuple[tuple[int, int, int], ...]
    negatives: tuple[tuple[int, int, int], ...]
    client_id: str
    session_id: str | None
    reset_state: bool
    result_extension: str | None  # None: the image's own format
    result_dtype: str
    result_compress: bool

    @property
    def owner(self) -> str:
        """Who sent the request: the MONAI Label session of a volume uploaded with `PUT /session/` if the request
        names one, else the client. Only a preference among the sessions the request's history may continue
        (`lib.session.store`): it never gives access to a session."""
        return self.session_id or self.client_id


class _CommonFields(BaseModel):
    """Keys every shape may carry; anything else MONAI Label or the viewer adds is ignored."""

    model_config = ConfigDict(extra="ignore")

    client_id: StrictStr | None = None
    reset_state: StrictBool = False
    result_extension: VolumeExtension | None = None
    result_dtype: ResultDtype = "uint8"
    # Compressed unless the client asks otherwise (OHIF sends false; Slicer sends nothing): the same voxels in a
    # gzip NRRD that every NRRD reader opens, 16.5 KB instead of 12.6 MB for the lesion mask of the 512x512x48 sample
    # CT, written in ~6 ms (2-core CPU, lib/mask_file.py) and sent without the ~60 ms HTTP of the raw file (H200).
    result_compress: StrictBool = True


class SlicerDeepEditRequest(_CommonFields):
    label: StrictStr


class DeepGrowRequest(_CommonFields):
    foreground: PointList
    background: PointList = []
    label: StrictStr | None = None


class OhifDeepEditRequest(_CommonFields):
    background: PointList = []


def _field_errors(error: ValidationError, prefix: str = "") -> RequestError:
    item = error.errors()[0]
    location = prefix + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"])
    return RequestError(location.lstrip("."), f"{item['msg']} (got {item.get('input')!r})")


def _validate(schema: type[BaseModel], request: dict) -> BaseModel:
    try:
        return schema.model_validate(request)
    except ValidationError as error:
        raise _field_errors(error) from None


def _point_list(request: dict, key: str) -> list[list[int]]:
    try:
        return _POINT_LIST.validate_python(request.get(key) or [])
    except ValidationError as error:
        raise _field_errors(error, prefix=key) from None


def _label_keyed_clicks(request: dict, label_names: list[str]) -> dict[str, list[list[int]]]:
    """Every label-keyed click list of the request; a list under an unknown name is refused."""
    clicks = {}
    for key, value in request.items():
        is_click_list = isinstance(value, list) and value and isinstance(value[0], list)
        if key in label_names:
            clicks[key] = _point_list(request, key)
        elif is_click_list and key not in ("foreground", "background"):
            raise RequestError(key, f"click list for unknown label {key!r}; labels are {label_names}")
    return clicks


def _check_label(label: str, label_names: list[str]) -> str:
    if label not in label_names or label == "background":
        targets = [name for name in label_names if name != "background"]
        raise RequestError("label", f"unknown label {label!r}; choose one of {targets}")
    return label


def parse_click_request(request: dict, label_names: list[str], ohif_target_label) -> ClickRequest:
    """Validate a request of any client shape into a ClickRequest; raises RequestError naming the field.

    ohif_target_label(clicks_by_label) -> label: resolves OHIF's label-less requests against the stored sessions.
    """
    session = request.get("session")
    session_id = session.get("name") if isinstance(session, dict) else None
    if "foreground" in request:
        fields = _validate(DeepGrowRequest, request)
        label = _check_label(fields.label or _default_label(label_names), label_names)
        positives = fields.foreground
    elif "label" in request:
        fields = _validate(SlicerDeepEditRequest, request)
        label = _check_label(fields.label, label_names)
        positives = _label_keyed_clicks(request, label_names).get(label, [])
    else:
        fields = _validate(OhifDeepEditRequest, request)
        clicked = {
            name: points
            for name, points in _label_keyed_clicks(request, label_names).items()
            if points and name != "background"
        }
        if not clicked:
            raise RequestError("params", "no label to segment: send clicks under a label name, or 'label'")
        label = ohif_target_label(clicked)
        positives = clicked[label]
    negatives = _point_list(request, "background")
    if len(positives) + len(negatives) > MAX_CLICKS:
        raise RequestError("params", f"{len(positives) + len(negatives)} clicks; at most {MAX_CLICKS} are accepted")
    return ClickRequest(
        label=label,
        positives=tuple(tuple(p) for p in positives),
        negatives=tuple(tuple(p) for p in negatives),
        client_id=fields.client_id or ANONYMOUS,
        session_id=session_id,
        reset_state=fields.reset_state,
        result_extension=fields.result_extension,
        result_dtype=fields.result_dtype,
        result_compress=fields.result_compress,
    )


def _default_label(label_names: list[str]) -> str:
    """DeepGrow requests without a label segment the first foreground label."""
    return next(name for name in label_names if name != "background")
