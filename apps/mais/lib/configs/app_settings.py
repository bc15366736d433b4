"""What `monailabel start_server ... --conf KEY VALUE` may set, validated once at start-up.

MONAI Label hands `--conf` pairs to the app as a dict of strings. A typo (`--conf memroy_mode both`) or a bad
value must stop the server with a message naming the option, not be ignored or fail on the first click, so
unknown keys are refused too.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lib.configs.labels import SAMPLE_LABELS
from lib.devices import DeviceName
from lib.model.config import MemoryMode

APP_DIR = Path(__file__).resolve().parents[2]
DEFAULT_WEIGHTS = APP_DIR / "model" / "mais_light.pt"
DEFAULT_TRAIN_DIR = APP_DIR / "model" / "trained"
TRAINED_WEIGHTS_NAME = "mais_trained.pt"


class AppConfigError(ValueError):
    """A start-up option or file the app cannot run with; the message says which and why."""


class AppSettings(BaseModel):
    """Options of the MAIS app; each one is a `--conf` key."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: Path = Field(
        DEFAULT_WEIGHTS, description="MAIS weights file (.pt); its network configuration is read from it"
    )
    train_dir: Path = Field(
        DEFAULT_TRAIN_DIR,
        description=f"training runs and their published weights ({TRAINED_WEIGHTS_NAME}, served instead of "
        "`weights` once it exists; delete it to go back)",
    )
    memory_mode: MemoryMode | None = Field(None, description="override the memory mode the weights were trained with")
    device: DeviceName = Field("auto", description="auto = cuda when a GPU is visible")
    labels: Path | None = Field(None, description="JSON file {label name: index}; default: the sample data's labels")
    session_ttl_s: float = Field(1800.0, gt=0, description="drop an interaction session idle this long (seconds)")
    max_sessions: int = Field(64, ge=1, description="most interaction sessions kept at once (oldest evicted)")
    max_session_mb: int = Field(4096, ge=64, description="most memory all sessions may hold together (MB)")
    # Read by MONAILabelApp itself; accepted so it is not refused as unknown.
    server_mode: bool = False

    @field_validator("weights", "labels", "train_dir")
    @classmethod
    def _resolve_path(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser().resolve()

    @classmethod
    def from_conf(cls, conf: dict[str, str] | None) -> AppSettings:
        """Parse MONAI Label's `conf` dict; raises AppConfigError naming each bad `--conf` key."""
        try:
            return cls.model_validate(conf or {})
        except ValidationError as error:
            problems = []
            for item in error.errors():
                key = ".".join(str(part) for part in item["loc"]) or "conf"
                if item["type"] == "extra_forbidden":
                    problems.append(f"unknown option --conf {key} (known: {', '.join(cls.model_fields)})")
                else:
                    problems.append(f"--conf {key} {item.get('input')!r}: {item['msg']}")
            raise AppConfigError("; ".join(problems)) from None

    @property
    def trained_weights(self) -> Path:
        """Where the trainer publishes the weights it fine-tuned."""
        return self.train_dir / TRAINED_WEIGHTS_NAME

    def served_weights(self) -> Path:
        """The weights the infer task serves: the fine-tuned ones once a training run has published them."""
        return self.trained_weights if self.trained_weights.is_file() else self.weights

    def label_map(self) -> dict[str, int]:
        """{label name: index} the infer task and the viewers use; `background` is always 0."""
        if self.labels is None:
            return dict(SAMPLE_LABELS)
        return read_label_map(self.labels)


def read_label_map(path: Path) -> dict[str, int]:
    """Read and check a `{name: index}` JSON label map (indices 1..255, unique; background added as 0)."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise AppConfigError(f"--conf labels {str(path)!r}: file not found") from None
    except (OSError, json.JSONDecodeError) as error:
        raise AppConfigError(f"--conf labels {str(path)!r}: not a readable JSON file ({error})") from None
    if not isinstance(raw, dict) or not raw:
        raise AppConfigError(f"--conf labels {str(path)!r}: expected a JSON object {{label name: index}}")
    label_map = {"background": 0}
    for name, index in raw.items():
        if name == "background":
            continue
        if not isinstance(index, int) or isinstance(index, bool) or not 1 <= index <= 255:
            raise AppConfigError(f"--conf labels {str(path)!r}: label {name!r} has index {index!r}, expected 1..255")
        if index in label_map.values():
            raise AppConfigError(f"--conf labels {str(path)!r}: index {index} is used twice")
        label_map[name] = index
    return label_map
