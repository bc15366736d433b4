"""Bytes one interaction session holds as its memory fills up to N entries (`InteractiveSession.nbytes`, what
the session store's `max_session_mb` bound counts), part by part.

Clicks on the sample CT's lesion, each on a voxel of the largest error drawn at random (SAM-Med3D's rule), until
every memory holds N entries (the weights' memory size, 60 for the shipped ones) or `--clicks` ran out.

    .venv/bin/python benchmarks/bench_session_memory.py                 # CPU
    .venv/bin/python benchmarks/bench_session_memory.py --device cuda
"""

from __future__ import annotations

import gc

import numpy as np
import torch
from common import SAMPLE_DATA, model_benchmark_parser

from lib.clicks.simulator import POSITIVE, Click, first_click, next_click
from lib.configs.labels import SAMPLE_LABELS
from lib.imaging import ModelSpaceImage, load_volume
from lib.model.weights import load_mais
from lib.session.interactive import InteractiveSession

MB = 2**20
MAX_SESSION_MB = 4096  # AppSettings.max_session_mb
# the parts of a session that stay in host memory on a GPU server: the model-space image (windows are cut from it
# and moved to the device) and the mask on the file's grid (numpy)
HOST_PARTS = ("image", "mask")


def main() -> None:
    parser = model_benchmark_parser(__doc__)
    parser.add_argument("--image", default="lung1.nii.gz", help="a file of sample-data with a label")
    parser.add_argument("--label", default="lesion")
    parser.add_argument("--clicks", type=int, default=200, help="at most this many clicks")
    args = parser.parse_args()

    model = load_mais(args.weights, device=torch.device(args.device))
    capacity = model.config.memory_size
    truth = np.asarray(load_volume(str(SAMPLE_DATA / "labels" / "final" / args.image)))[0]
    truth = truth == SAMPLE_LABELS[args.label]
    image = ModelSpaceImage.from_file(str(SAMPLE_DATA / args.image))
    on_gpu = args.device.startswith("cuda")
    allocated_before = torch.cuda.memory_allocated() if on_gpu else 0
    session = InteractiveSession(image, model)
    rng = np.random.default_rng(0)
    click = first_click(truth, rng)
    report_at = {1, 10, capacity}
    print(f"{args.image}:{args.label} on {args.device}, memory size N = {capacity}")
    columns = [*session.nbytes_by_part(), "total"]
    print(f"{'clicks':>6s} {'windows':>7s} {'entries':>7s}  " + "  ".join(f"{c:>21s}" for c in columns))
    for clicked in range(1, args.clicks + 1):
        session.add_click(click)
        entries = min(len(w.interaction.memory) for w in session.windows)
        if clicked in report_at or entries == capacity:
            parts = session.nbytes_by_part()
            row = "  ".join(f"{size / MB:18.2f} MB" for size in [*parts.values(), sum(parts.values())])
            print(f"{clicked:6d} {len(session.windows):7d} {entries:7d}  {row}")
        if entries == capacity:
            break
        click = next_click(truth, session.mask, rng, rule="random") or Click(first_click(truth, rng).coord, POSITIVE)
    total = session.nbytes
    per_entry = session.nbytes_by_part()["window memories"] / sum(len(w.interaction.memory) for w in session.windows)
    print(f"bytes per session at {entries} memory entries: {total} ({total / MB:.1f} MB)")
    print(f"one memory entry: {per_entry / MB:.3f} MB")
    print(f"sessions within the default max_session_mb {MAX_SESSION_MB}: {MAX_SESSION_MB * MB // total}")
    if on_gpu:  # what the session really holds on the GPU, against the parts of nbytes that live there
        on_device = sum(size for part, size in session.nbytes_by_part().items() if part not in HOST_PARTS)
        allocated = torch.cuda.memory_allocated()
        del session
        gc.collect()
        freed = allocated - torch.cuda.memory_allocated()
        print(f"GPU memory allocated since before the session: {(allocated - allocated_before) / MB:.1f} MB")
        print(
            f"GPU memory freed when the session is dropped: {freed / MB:.1f} MB; nbytes of its GPU parts: "
            f"{on_device / MB:.1f} MB"
        )


if __name__ == "__main__":
    main()
