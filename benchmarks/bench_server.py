"""End-to-end click latency of the `mais` infer task over HTTP, driven the way 3D Slicer drives it.

Every request carries the full click history of the segment (Slicer's DeepEdit shape, NRRD uint8 result) and
the time is measured at the client, result download included. The answer is MONAI Label's multipart one, result
JSON and image, which is what Slicer's client (MONAILabelClient, no `output`) gets; the JSON's `latencies` give
the server's seconds per stage. Clicks follow the evaluation rule (interior of the structure first, then the
centre of the largest error) against the sample data's labels. Each repetition uses a new client id, so its first
click pays for loading the image and embedding the crop.

Printed: the first and later clicks' median and p95 per case, then the median of each stage per case: `pre`
(the server's request parsing and preparing together: weights, image in model space, session), `predict`
(interaction steps), `to grid` (logits back onto the image's grid), `write` (the result file), and `HTTP`
(the client's time less the server's `total`: MONAI Label's request handling, the multipart answer, transfer).

--large-ct adds lung1_300, lung1 resampled to 512 x 512 x 300 (scripts/build_large_ct.py; with --url it must be
in --studies before the server starts, without --url it is built into the server's copy of sample-data).
Stopped by SIGTERM (a time limit), it prints the tables of the clicks made so far under a CUT SHORT line and
exits with 124.

    .venv/bin/python benchmarks/bench_server.py                 # starts a server on a copy of sample-data
    .venv/bin/python benchmarks/bench_server.py --url http://127.0.0.1:8000 --studies sample-data
    .venv/bin/python benchmarks/bench_server.py --url http://127.0.0.1:8000 --studies /tmp/studies --large-ct
    .venv/bin/python benchmarks/bench_server.py --weights /tmp/candidate.pt --cases lung1   # a candidate's latency
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import nrrd
import numpy as np
import requests
from monai.transforms import LoadImage
from requests_toolbelt.multipart.decoder import MultipartDecoder

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "apps" / "mais"), str(REPO_ROOT / "tests"), str(REPO_ROOT / "scripts")]

import build_large_ct  # noqa: E402
from annotators import boxed_next_click  # noqa: E402
from lib.clicks.simulator import POSITIVE, first_click  # noqa: E402
from lib.configs.labels import SAMPLE_LABELS  # noqa: E402
from server import Cut, raise_cut_on_sigterm, server_benchmark_parser, serving  # noqa: E402

# (image id, file name, label): the 512x512 CT, the anisotropic non-RAS NRRD, a small and a large brain structure
CASES = [
    ("lung1", "lung1.nii.gz", "lesion"),
    ("brain1", "brain1.nrrd", "lesion"),
    ("colin27_t1", "colin27_t1.nii.gz", "thalamus_left"),
    ("icbm2009a_t1", "icbm2009a_t1.nii.gz", "white_matter"),
]
# the same CT in 300 slices of 0.8 mm (scripts/build_large_ct.py): 6.25 x the voxels on the original grid
LARGE_CT = (build_large_ct.IMAGE_ID, build_large_ct.FILE_NAME, "lesion")
# the server's `latencies` keys (lib/infers/mais.py), as printed
STAGES = [("pre", "pre"), ("infer", "predict"), ("invert", "to grid"), ("write", "write")]


def slicer_request(url: str, client_id: str, image: str, label: str, clicks, out: Path):
    """One request with the whole history; returns (seconds, mask on the original grid, server latencies)."""
    params = {name: [] for name in SAMPLE_LABELS}
    params[label] = [list(c.coord) for c in clicks if c.label == POSITIVE]
    params["background"] = [list(c.coord) for c in clicks if c.label != POSITIVE]
    params.update(label=label, client_id=client_id, result_extension=".nrrd", result_dtype="uint8")
    started = time.perf_counter()
    response = requests.post(
        f"{url}/infer/mais",
        params={"image": image, "output": "all"},  # Slicer's client sends none: the same multipart answer
        files={"params": (None, json.dumps(params))},
        timeout=300,
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    result, image_bytes = None, None
    for part in MultipartDecoder.from_response(response).parts:
        disposition = part.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disposition:
            result = json.loads(part.content)
        elif 'name="image"' in disposition:
            image_bytes = part.content
    if result is None or image_bytes is None:
        raise RuntimeError(f"unexpected answer: {response.headers.get('content-type')} {response.content[:200]!r}")
    out.write_bytes(image_bytes)
    # the voxels in the file's [I, J, K] order, as LoadImage gives them (0.1 s instead of 1.5 s on the 300-slice CT)
    return elapsed, np.asarray(nrrd.read(str(out), index_order="F")[0]) > 0, result["latencies"]


def run_case(url: str, studies: Path, case: tuple[str, str, str], clicks: int, repeat: int, out: Path, result: dict):
    """The case's clicks, their seconds recorded in `result` as they come (a cut run keeps what it measured)."""
    image, file_name, label = case
    first, later, stages = result["first"], result["later"], result["stages"]
    gt = np.asarray(LoadImage(image_only=True)(str(studies / "labels" / "final" / file_name))) == SAMPLE_LABELS[label]
    rng = np.random.default_rng(0)
    for rep in range(repeat):
        history = [first_click(gt, rng)]
        for step in range(clicks):
            seconds, mask, latencies = slicer_request(url, f"bench-{image}-{rep}", image, label, history, out)
            (first if step == 0 else later).append(seconds)
            stages["first" if step == 0 else "later"].append({**latencies, "client": seconds})
            click = boxed_next_click(gt, mask, rng)
            if click is None:
                break
            history.append(click)


def summary(values: list[float]) -> str:
    return f"{np.median(values) * 1000:7.0f} {np.percentile(values, 95) * 1000:7.0f}" if values else "      -       -"


def stage_row(name: str, clicks: list[dict]) -> str:
    if not clicks:
        return f"{name:34s} {0:3d}" + "       -" * (len(STAGES) + 2)

    def median_ms(values) -> str:
        return f"{np.median(values) * 1000:8.0f}"

    cells = [median_ms([c["client"] for c in clicks])]
    cells += [median_ms([c[key] for c in clicks]) for key, _ in STAGES]
    cells.append(median_ms([c["client"] - c["total"] for c in clicks]))
    return f"{name:34s} {len(clicks):3d}" + "".join(cells)


def main() -> None:
    parser = server_benchmark_parser(__doc__)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--large-ct", action="store_true", help="add lung1_300 (512 x 512 x 300) to the cases")
    parser.add_argument("--cases", nargs="+", metavar="IMAGE", help="only these image ids (default: all)")
    args = parser.parse_args()
    cases = CASES + ([LARGE_CT] if args.large_ct else [])
    if args.cases:
        unknown = set(args.cases) - {image for image, _, _ in cases}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; known: {[image for image, _, _ in cases]}")
        cases = [case for case in cases if case[0] in args.cases]

    raise_cut_on_sigterm()
    results = [
        {"case": f"{image}:{label}", "first": [], "later": [], "stages": {"first": [], "later": []}}
        for image, _, label in cases
    ]
    interrupted = False
    try:
        with (
            tempfile.TemporaryDirectory() as tmp,
            serving(args.url, Path(tmp), build_large_ct.build if args.large_ct else None, args.weights) as (url, copy),
        ):
            studies = copy or args.studies
            for case, result in zip(cases, results):
                run_case(url, studies, case, args.clicks, args.repeat, Path(tmp) / "result.nrrd", result)
    except Cut:
        interrupted = True
        clicks = sum(len(r["first"]) + len(r["later"]) for r in results)
        print(f"CUT SHORT by SIGTERM after {clicks} clicks: the rows below hold the clicks made before it")

    print(f"{'case':28s} {'first click ms':>15s} {'later clicks ms':>15s}")
    print(f"{'':28s} {'median     p95':>15s} {'median     p95':>15s}")
    for result in results:
        print(f"{result['case']:28s} {summary(result['first'])} {summary(result['later'])}")
    all_first = [t for r in results for t in r["first"]]
    all_later = [t for r in results for t in r["later"]]
    print(f"{'all':28s} {summary(all_first)} {summary(all_later)}")

    print()
    print("stage medians, ms (pre = the server's parse + prepare; HTTP = client - server total)")
    print(f"{'case':34s} {'n':>3s}" + "".join(f"{h:>8s}" for h in ["client", *(n for _, n in STAGES), "HTTP"]))
    for result in results:
        for which in ("first", "later"):
            print(stage_row(f"{result['case']} {which}", result["stages"][which]))
    if interrupted:
        sys.exit(124)


if __name__ == "__main__":
    main()
