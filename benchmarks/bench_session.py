"""Click latency of an interaction session without the server: the part of a click the device speeds up.

Runs the same cases and click rules as `bench_server.py`, calling `InteractiveSession.add_click` directly (model
step, upsampling, resampling onto the original grid). Used where the server cannot run, e.g. on the GPU
machine, whose Python lacks monailabel; HTTP and result writing come on top (see bench_server.py on the CPU).

    .venv/bin/python benchmarks/bench_session.py --device cuda
"""

from __future__ import annotations

import time

import numpy as np
import torch
from bench_server import CASES, summary
from common import REPO_ROOT, model_benchmark_parser

from lib.clicks.simulator import first_click, next_click
from lib.configs.labels import SAMPLE_LABELS
from lib.imaging import ModelSpaceImage, load_volume
from lib.model.weights import load_mais
from lib.session.interactive import InteractiveSession


def main() -> None:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    device = torch.device(args.device)
    model = load_mais(args.weights, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    studies = REPO_ROOT / "sample-data"
    print(f"{'case':28s} {'first click ms':>15s} {'later clicks ms':>15s}   device {device}")
    for image_id, file_name, label in CASES:
        gt = np.asarray(load_volume(str(studies / "labels" / "final" / file_name)))[0] == SAMPLE_LABELS[label]
        image = ModelSpaceImage.from_file(str(studies / file_name))
        rng = np.random.default_rng(0)
        first, later = [], []
        for _ in range(args.repeat):
            session = InteractiveSession(image, model)
            click = first_click(gt, rng)
            for step in range(args.clicks):
                started = time.perf_counter()
                session.add_click(click)
                sync()
                (first if step == 0 else later).append(time.perf_counter() - started)
                click = next_click(gt, session.mask, rng)
                if click is None:
                    break
        print(f"{image_id + ':' + label:28s} {summary(first)} {summary(later)}")


if __name__ == "__main__":
    main()
