"""Click latency of an interaction session without the server: the part of a click the device speeds up.

Runs the same cases and click rules as `bench_server.py`, calling `InteractiveSession.add_click` directly (model
step, upsampling, resampling onto the original grid). Used where the server cannot run, e.g. on the GPU
machine, whose Python lacks monailabel (it needs wheels there of scripts/train_generalist.sh's packages and of
bench_server.py's imports: pynrrd, requests, requests-toolbelt and theirs); HTTP and result writing come on top
(see bench_server.py on the CPU).

    .venv/bin/python benchmarks/bench_session.py --device cuda
    .venv/bin/python benchmarks/bench_session.py --device cuda --profile 30   # and where a later click's time goes

The model runs as the server runs it (`lib.model_loader.prepare_for_serving`: on a GPU, the mask decoder as CUDA
graphs). `--compare-eager` then replays the first case's clicks with the decoder run kernel by kernel and prints
how far the two sessions' masks and logits are apart.

`--profile N` then runs the first case's later clicks once more under torch.profiler and prints its N most
expensive operators (one row per operator and input shapes) by their own time on the host and on the GPU, with
the clicks' wall time beside the GPU's busy time: a click bound by launches and the host shows GPU time well
below wall time.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from bench_server import CASES, summary
from common import REPO_ROOT, model_benchmark_parser, print_profile, profiler_activities

from lib.clicks.simulator import first_click, next_click
from lib.configs.labels import SAMPLE_LABELS
from lib.imaging import ModelSpaceImage, load_volume
from lib.model.weights import load_mais
from lib.model_loader import prepare_for_serving
from lib.session.interactive import InteractiveSession


def main() -> None:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile the first case's later clicks")
    parser.add_argument(
        "--compare-eager", action="store_true", help="the first case's masks with and without the CUDA graphs"
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    model = load_mais(args.weights, device=device)
    prepare_for_serving(model)
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
        if image_id == CASES[0][0]:
            first_case = (image, gt, model, args.clicks, sync)
    if device.type == "cuda":
        print(
            f"GPU memory allocated {torch.cuda.memory_allocated(device) / 2**20:.0f} MiB, reserved "
            f"{torch.cuda.memory_reserved(device) / 2**20:.0f} MiB, decoder graphs "
            f"{len(model.decoder_graphs) if model.decoder_graphs else 0}"
        )
    if args.compare_eager:
        compare_eager(*first_case[:4])
    if args.profile:
        profile_later_clicks(*first_case, rows=args.profile)


def compare_eager(image: ModelSpaceImage, gt: np.ndarray, model, clicks: int) -> None:
    """The same clicks in two sessions, the decoder replayed as CUDA graphs in one and run kernel by kernel in
    the other: the voxels where their masks differ and the largest difference of their logits, per click."""
    if model.decoder_graphs is None:
        print("no CUDA graphs to compare (CPU)")
        return
    sessions = {}
    for graphs in (True, False):
        model.decoder_graphs.enabled = graphs
        rng = np.random.default_rng(2)
        session, masks, logits = InteractiveSession(image, model), [], []
        click = first_click(gt, rng)
        for _ in range(clicks):
            session.add_click(click)
            masks.append(session.mask.copy())
            logits.append(session.logits.float().cpu())
            click = next_click(gt, masks[-1], rng)
            if click is None:
                break
        sessions[graphs] = (masks, logits)
    model.decoder_graphs.enabled = True
    for k, (mask_g, logit_g, mask_e, logit_e) in enumerate(zip(*sessions[True], *sessions[False])):
        print(
            f"click {k + 1}: {int((mask_g != mask_e).sum())} mask voxels differ (of {int(mask_e.sum())}), largest "
            f"logit difference {float((logit_g - logit_e).abs().max()):.2e}"
        )


def profile_later_clicks(image: ModelSpaceImage, gt: np.ndarray, model, clicks: int, sync, rows: int) -> None:
    """One session's clicks 2..K under torch.profiler: the operators' own host and GPU time, and the share of the
    clicks' wall time the GPU was busy."""
    from torch.profiler import profile

    rng = np.random.default_rng(1)
    session = InteractiveSession(image, model)
    session.add_click(first_click(gt, rng))
    sync()
    wall_s = 0.0  # of the clicks alone: placing the next one (distance transforms) is no part of a click
    with profile(activities=profiler_activities(), record_shapes=True) as profiler:
        for _ in range(clicks - 1):
            click = next_click(gt, session.mask, rng)
            if click is None:
                break
            started = time.perf_counter()
            session.add_click(click)
            sync()
            wall_s += time.perf_counter() - started
    print_profile(profiler, f"{clicks - 1} later clicks", wall_s, rows)


if __name__ == "__main__":
    main()
