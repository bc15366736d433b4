"""Official SAM-Med3D checkpoints: load one into a MAIS model, or turn one you downloaded (e.g.
sam_med3d_turbo.pth) into a MAIS weights file.

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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import Tensor

from lib.model.builder import build_mais
from lib.model.config import MaisConfig
from lib.model.mais import Mais
from lib.model.weights import WeightsError, check_state_dict, is_sam_med3d, read_torch_file, save_mais

logger = logging.getLogger(__name__)

SAM_MED3D_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")


def load_sam_med3d_checkpoint(
    model: Mais,
    checkpoint: str | os.PathLike | Mapping[str, Tensor],
    parts: Sequence[str] = SAM_MED3D_PARTS,
    trusted: bool = False,
) -> Mais:
    """Load an official SAM-Med3D checkpoint ({"model_state_dict": ...}, or that state dict) into `model`.

    Strict over `parts` (default all three; ("prompt_encoder", "mask_decoder") initialises a light model's
    decoder from SAM-Med3D): every key of those parts must be there with its shape. The memory attention is not in
    the checkpoint and keeps its weights. trusted: a checkpoint that pickles more than tensors (the authors load
    theirs with weights_only=False) is read only with trusted=True, which lets the file run code; pass it only for
    a file from a source you trust. Returns the model.
    """
    unknown = set(parts) - set(SAM_MED3D_PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}, choose from {SAM_MED3D_PARTS}")
    source = "state dict" if isinstance(checkpoint, Mapping) else str(checkpoint)
    payload = checkpoint if isinstance(checkpoint, Mapping) else read_torch_file(checkpoint, trusted=trusted)
    state = payload.get("model_state_dict", payload) if isinstance(payload, Mapping) else payload
    if not is_sam_med3d(state):
        raise WeightsError(f"{source}: not a SAM-Med3D checkpoint (no 'model_state_dict' with 'mask_decoder.' keys)")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    foreign = sorted(k for k in state if k.split(".", 1)[0] not in SAM_MED3D_PARTS)
    if foreign:
        raise WeightsError(f"{source}: unexpected key {foreign[0]!r} ({len(foreign)} keys outside {SAM_MED3D_PARTS})")
    expected = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] in parts}
    chosen = {k: v for k, v in state.items() if k.split(".", 1)[0] in parts}
    check_state_dict(expected, chosen, source=source)
    for part in parts:
        prefix = part + "."
        getattr(model, part).load_state_dict({k[len(prefix) :]: v for k, v in chosen.items() if k.startswith(prefix)})
    logger.info("loaded SAM-Med3D %s from %s", ", ".join(parts), source)
    return model


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
