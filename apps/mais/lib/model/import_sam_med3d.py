"""Turn an official SAM-Med3D checkpoint you downloaded (e.g. sam_med3d_turbo.pth) into a MAIS weights file.

    cd apps/mais
    python -m lib.model.import_sam_med3d /path/to/sam_med3d_turbo.pth /path/to/sam_med3d_turbo_mais.pt --trusted
    monailabel start_server --app apps/mais --studies sample-data --conf weights /path/to/sam_med3d_turbo_mais.pt

The checkpoint is loaded strictly (every key and shape of image encoder, prompt encoder and mask decoder). It
holds no memory attention, so the file is written in memory mode "none": exactly SAM-Med3D, until the `mais`
trainer fine-tunes a memory on your labels. The authors pickle more than tensors into their checkpoint:
`--trusted` lets torch unpickle it, which can run code: use it only for a file from a source you trust.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from lib.model.build import MaisConfig, build_mais, load_sam_med3d_checkpoint, save_mais


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="official SAM-Med3D checkpoint ({'model_state_dict': ...})")
    parser.add_argument("out", type=Path, help="MAIS weights file to write")
    parser.add_argument("--trusted", action="store_true", help="allow pickled objects besides tensors")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    model = build_mais(MaisConfig.sam_med3d(memory_mode="none"))
    load_sam_med3d_checkpoint(model, args.checkpoint, trusted=args.trusted)
    save_mais(model, args.out, metadata={"imported_from": args.checkpoint.name})
    print(f"wrote {args.out}: SAM-Med3D, memory mode none; start the server with --conf weights {args.out}")


if __name__ == "__main__":
    main()
