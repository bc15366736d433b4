"""The masks a fixed click sequence gets over HTTP, pinned by hash: restructuring the code must not change them.

Three sample images (an anisotropic LPS NRRD MR, a CT, a 1 mm MR), four clicks each in Slicer's request shape,
positives and negatives mixed. The clicks were drawn once at the largest error's centre and are stored with the
hashes, so the test replays exactly the same requests. The hashes belong to one weights file (its SHA-256 is
stored too): a change of the shipped weights or of the model's arithmetic that is meant regenerates the file in
the same commit:

    python tests/test_golden_masks.py --update
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

if __name__ == "__main__":  # run as a script: the app's code on the path, as conftest.py puts it for pytest
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "apps" / "mais"))

from clicking import interior_voxel, load, slicer_click
from server import APP_DIR, REPO_ROOT, SAMPLE_DATA, MonaiLabelServer, copy_sample_data

GOLDEN_FILE = REPO_ROOT / "tests" / "data" / "golden_masks.json"
SHIPPED_WEIGHTS = APP_DIR / "model" / "mais_light.pt"
# (image id, label, label file value) of the sequences; the values are sample-data's label map (lib/configs/labels.py)
CASES = (("brain1", "lesion", 1), ("lung1", "lesion", 1), ("colin27_t1", "putamen_left", 11))
CLICKS_PER_CASE = 4

pytestmark = pytest.mark.server


def mask_hash(mask: np.ndarray) -> str:
    """SHA-256 of the mask's shape and its voxels as uint8, in C order."""
    digest = hashlib.sha256(repr(mask.shape).encode())
    digest.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    return digest.hexdigest()


def file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replay(url: str, user: str, image: str, label: str, clicks: list[dict]) -> list[str]:
    """Send the growing history of `clicks` ([{"positive": bool, "voxel": [i, j, k]}, ...]); a hash per answer."""
    positives, negatives, hashes = [], [], []
    for click in clicks:
        (positives if click["positive"] else negatives).append(click["voxel"])
        mask, _, _ = slicer_click(url, user, image, label, positives, negatives)
        hashes.append(mask_hash(mask))
    return hashes


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    """A server of its own: the shared one may serve weights that a training test published."""
    work = tmp_path_factory.mktemp("golden")
    with MonaiLabelServer(copy_sample_data(work / "sample-data"), work / "server.log") as running:
        yield running


def test_fixed_click_sequences_give_the_pinned_masks(shipped_server):
    golden = json.loads(GOLDEN_FILE.read_text())
    assert file_hash(SHIPPED_WEIGHTS) == golden["weights_sha256"], (
        "the shipped weights changed: regenerate the pinned masks with `python tests/test_golden_masks.py --update`"
    )
    for case in golden["cases"]:
        hashes = replay(shipped_server.url, f"golden-{case['image']}", case["image"], case["label"], case["clicks"])
        assert hashes == case["mask_sha256"], f"{case['image']} {case['label']}: masks differ from the pinned ones"


def _draw_cases(url: str) -> list[dict]:
    """Clicks at the centre of the largest error, as the evaluation draws them, with the masks they get."""
    from lib.clicks.simulator import POSITIVE, next_click

    cases = []
    for image, label, value in CASES:
        label_file = next((SAMPLE_DATA / "labels" / "final").glob(f"{image}.*"))
        truth = load(label_file)[0] == value
        clicks = [{"positive": True, "voxel": interior_voxel(label_file, value)}]
        positives, negatives = [clicks[0]["voxel"]], []
        while True:
            mask, _, _ = slicer_click(url, f"draw-{image}", image, label, positives, negatives)
            if len(clicks) == CLICKS_PER_CASE:
                break
            click = next_click(truth, mask > 0, np.random.default_rng(0))
            voxel = [int(v) for v in click.coord]
            clicks.append({"positive": click.label == POSITIVE, "voxel": voxel})
            (positives if click.label == POSITIVE else negatives).append(voxel)
        cases.append({"image": image, "label": label, "clicks": clicks})
    for case in cases:
        case["mask_sha256"] = replay(url, f"hash-{case['image']}", case["image"], case["label"], case["clicks"])
    return cases


def main() -> None:
    if sys.argv[1:] != ["--update"]:
        sys.exit(__doc__)
    with tempfile.TemporaryDirectory() as work:
        studies = copy_sample_data(Path(work) / "sample-data")
        with MonaiLabelServer(studies, Path(work) / "server.log") as running:
            cases = _draw_cases(running.url)
    golden = {"weights_sha256": file_hash(SHIPPED_WEIGHTS), "cases": cases}
    GOLDEN_FILE.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN_FILE}")


if __name__ == "__main__":
    main()
