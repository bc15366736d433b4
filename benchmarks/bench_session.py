"""Click latency of an interaction session without the server: the part of a click the device speeds up.

Runs the same cases and click rules as `bench_server.py`, calling `InteractiveSession.add_click` directly (model
step, upsampling, resampling onto the original grid). Used where the server cannot run, e.g. on the GPU
machine, whose Python lacks monailabel; HTTP and result writing come on top (see bench_server.py on the CPU).

    .venv/bin/python benchmarks/bench_session.py --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT / "apps" / "mais"), str(Path(__file__).parent)]

from bench_server import CASES, summary  # noqa: E402

from lib.clicks.simulator import first_click, next_click  # noqa: E402
from lib.configs.labels import SAMPLE_LABELS  # noqa: E402
from lib.imaging import ModelSpaceImage, load_volume  # noqa: E402
from lib.model.weights import load_mais  # noqa: E402
from lib.session.interactive import InteractiveSession  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", type=Path, default=REPO_ROOT / "apps" / "mais" / "model" / "mais_light.pt")
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
