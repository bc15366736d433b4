"""End-to-end click latency of the `mais` infer task over HTTP, driven the way 3D Slicer drives it.

Every request carries the full click history of the segment (Slicer's DeepEdit shape, NRRD uint8 result) and
the time is measured at the client, result download included. Clicks follow the evaluation rule (interior of
the structure first, then the centre of the largest error) against the sample data's labels. Each repetition
uses a new client id, so its first click pays for loading the image and embedding the crop.

    .venv/bin/python benchmarks/bench_server.py                 # starts a server on a copy of sample-data
    .venv/bin/python benchmarks/bench_server.py --url http://127.0.0.1:8000 --studies sample-data
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from monai.transforms import LoadImage

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "apps" / "mais"), str(REPO_ROOT / "tests")]

from lib.clicks.simulator import POSITIVE, first_click, next_click  # noqa: E402
from lib.configs.labels import SAMPLE_LABELS  # noqa: E402
from server import server_benchmark_parser, serving  # noqa: E402

# (image id, file name, label): the 512x512 CT, the anisotropic non-RAS NRRD, a small and a large brain structure
CASES = [
    ("lung1", "lung1.nii.gz", "lesion"),
    ("brain1", "brain1.nrrd", "lesion"),
    ("colin27_t1", "colin27_t1.nii.gz", "thalamus_left"),
    ("icbm2009a_t1", "icbm2009a_t1.nii.gz", "white_matter"),
]


def slicer_request(url: str, client_id: str, image: str, label: str, clicks, out: Path) -> tuple[float, np.ndarray]:
    """One request with the whole history; returns (seconds, mask on the original grid)."""
    params = {name: [] for name in SAMPLE_LABELS}
    params[label] = [list(c.coord) for c in clicks if c.label == POSITIVE]
    params["background"] = [list(c.coord) for c in clicks if c.label != POSITIVE]
    params.update(label=label, client_id=client_id, result_extension=".nrrd", result_dtype="uint8")
    started = time.perf_counter()
    response = requests.post(
        f"{url}/infer/mais",
        params={"image": image, "output": "image"},
        files={"params": (None, json.dumps(params))},
        timeout=120,
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    out.write_bytes(response.content)
    return elapsed, np.asarray(LoadImage(image_only=True)(str(out))) > 0


def run_case(url: str, studies: Path, case: tuple[str, str, str], clicks: int, repeat: int, out: Path) -> dict:
    image, file_name, label = case
    gt = np.asarray(LoadImage(image_only=True)(str(studies / "labels" / "final" / file_name))) == SAMPLE_LABELS[label]
    rng = np.random.default_rng(0)
    first, later = [], []
    for rep in range(repeat):
        history = [first_click(gt, rng)]
        for step in range(clicks):
            seconds, mask = slicer_request(url, f"bench-{image}-{rep}", image, label, history, out)
            (first if step == 0 else later).append(seconds)
            click = next_click(gt, mask, rng)
            if click is None:
                break
            history.append(click)
    return {"case": f"{image}:{label}", "first": first, "later": later}


def summary(values: list[float]) -> str:
    return f"{np.median(values) * 1000:7.0f} {np.percentile(values, 95) * 1000:7.0f}" if values else "      -       -"


def main() -> None:
    parser = server_benchmark_parser(__doc__)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp, serving(args.url, Path(tmp)) as url:
        results = [
            run_case(url, args.studies, case, args.clicks, args.repeat, Path(tmp) / "result.nrrd") for case in CASES
        ]

    print(f"{'case':28s} {'first click ms':>15s} {'later clicks ms':>15s}")
    print(f"{'':28s} {'median     p95':>15s} {'median     p95':>15s}")
    for result in results:
        print(f"{result['case']:28s} {summary(result['first'])} {summary(result['later'])}")
    all_first = [t for r in results for t in r["first"]]
    all_later = [t for r in results for t in r["later"]]
    print(f"{'all':28s} {summary(all_first)} {summary(all_later)}")


if __name__ == "__main__":
    main()
