"""Many annotators on one server at once, over HTTP: latency, errors, and masks against each annotator's alone.

N simulated annotators (`tests/annotators.py`: Slicer and OHIF shapes, three sample images and labels, histories
that are shared or part) click M times each. First every annotator clicks alone, one after the other, which
fixes its clicks and the masks it gets; then all send the same requests at once, a thread each. Printed: the
latency median and p95 alone and together, the errors, and the masks that differ from the annotator's alone.
Stopped by SIGTERM (a time limit), it prints what it measured so far under a CUT SHORT line and exits with 124.

    .venv/bin/python benchmarks/bench_concurrency.py        # 20 x 20, a server started on a copy of sample-data
    .venv/bin/python benchmarks/bench_concurrency.py --users 2 --clicks 2
    .venv/bin/python benchmarks/bench_concurrency.py --url http://127.0.0.1:8000 --studies sample-data
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "apps" / "mais"), str(REPO_ROOT / "tests")]

from annotators import Outcome, click_alone, click_together, team  # noqa: E402
from server import Cut, raise_cut_on_sigterm, server_benchmark_parser, serving  # noqa: E402


def percentiles(seconds: list[float]) -> str:
    if not seconds:
        return "p50 - ms, p95 - ms"
    return f"p50 {np.median(seconds) * 1000:.0f} ms, p95 {np.percentile(seconds, 95) * 1000:.0f} ms"


def main() -> None:
    parser = server_benchmark_parser(__doc__)
    parser.add_argument("--users", type=int, default=20)
    parser.add_argument("--clicks", type=int, default=20)
    args = parser.parse_args()

    raise_cut_on_sigterm()
    plans, alone_seconds, outcome, wall, url, interrupted = {}, [], Outcome(), 0.0, args.url, False
    try:
        with tempfile.TemporaryDirectory() as tmp, serving(args.url, Path(tmp), weights=args.weights) as (url, _):
            for annotator in team(args.users):
                plans[annotator], seconds = click_alone(url, args.studies, annotator, args.clicks)
                alone_seconds += seconds
            started = time.perf_counter()
            try:
                click_together(url, plans, outcome)
            finally:
                wall = time.perf_counter() - started
    except Cut:
        interrupted = True
        print(f"CUT SHORT by SIGTERM: {len(plans)} annotators done alone, {len(outcome.latencies)} answers together")

    requests = sum(len(made) for made in plans.values())
    print(f"{args.users} annotators x {args.clicks} clicks ({requests} requests) at {url}")
    print(f"alone, one after the other: {percentiles(alone_seconds)}")
    print(f"together:                   {percentiles(outcome.latencies)}, {wall:.1f} s wall")
    print(f"errors: {len(outcome.errors)}, masks unlike alone: {len(outcome.mismatches)}")
    for problem in outcome.errors + outcome.mismatches:
        print(f"  {problem}")
    if interrupted:  # the together threads may still be sending: end here, without waiting for them
        sys.stdout.flush()
        os._exit(124)
    if outcome.errors or outcome.mismatches:
        sys.exit(1)


if __name__ == "__main__":
    main()
