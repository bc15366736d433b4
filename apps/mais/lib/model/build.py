"""Configurations, builders and weights files of the MAIS model.

    from lib.model.build import MaisConfig, build_mais, save_mais, load_mais, load_sam_med3d_checkpoint, WeightsError

    cfg = MaisConfig.light()                 # shipped default: light encoder; or MaisConfig.sam_med3d()
    cfg = MaisConfig.light(memory_mode="dense", memory_size=60)
    model = build_mais(cfg)                  # eval-mode Mais (lib.model.mais), random weights
    load_sam_med3d_checkpoint(model, "sam_med3d_turbo.pth", trusted=True)   # official weights, strict
    save_mais(model, "mais.pt", metadata={"trained_on": "..."})
    model = load_mais("mais.pt", device="cpu", memory_mode=None)  # config comes from the file

Weights file ("mais" format, written atomically, readable with torch.load(weights_only=True)):
    {"format": "mais", "format_version": 1, "config": MaisConfig.to_dict(), "model_state_dict": {...},
     "metadata": {...}}

Every loading error is a WeightsError (a ValueError) whose message names the file and, for a key problem, the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import torch
from medim.models.sam_med3d import MaskDecoder3D, PromptEncoder3D
from torch import Tensor, nn

from .image_encoder import ImageEncoder3D
from .mais import Mais
from .memory_attention import MEMORY_MODES, MemoryAttention, MemoryAttentionConfig

logger = logging.getLogger(__name__)

FORMAT = "mais"
FORMAT_VERSION = 1
# SAM-Med3D's prompt embedding width; medim's MaskDecoder3D fixes its transformer around it (8 heads, MLP 2048)
PROMPT_EMBED_DIM = 384
SAM_MED3D_PARTS = ("image_encoder", "prompt_encoder", "mask_decoder")
PROMPT_CLICKS = ("all", "latest")


class WeightsError(ValueError):
    """A weights file or state dict that cannot be loaded; the message says which file / key and why."""


@dataclass(frozen=True)
class EncoderConfig:
    """ViT image encoder (medim's ImageEncoderViT3D). window_size 0 makes every block global."""

    embed_dim: int
    depth: int
    num_heads: int
    window_size: int
    global_attn_indexes: tuple[int, ...] = ()
    img_size: int = 128
    patch_size: int = 16
    mlp_ratio: float = 4.0
    # medim's neck ends in a 3^3 conv of 384x384 channels (4.0 M parameters); 1 makes it a 1x1 conv (0.15 M).
    neck_kernel_size: int = 3


@dataclass(frozen=True)
class MaisConfig:
    """Everything `build_mais` needs; stored in every weights file.

    memory_mode: "none" (SAM-Med3D alone), "sparse", "dense" or "both". memory_size: N, the FIFO capacity (the
    paper's 60). memory_dtype: storage dtype of the memory bank ("float16": 131 KB a slot, see memory_bank.py).
    prompt_clicks: which clicks the prompt encoder gets at each interaction step, the same in training and
    inference: "all" (every click so far) or "latest" (only the step's new click, as SAM-Med3D's own training and
    validation do and the MAIS paper's baseline: earlier clicks then reach the model only through the previous
    mask and, with a memory, the memory bank). Weights trained with one are used with the same one.
    """

    name: str
    encoder: EncoderConfig
    memory_attention: MemoryAttentionConfig = field(default_factory=MemoryAttentionConfig)
    memory_mode: str = "both"
    memory_size: int = 60
    memory_dtype: str = "float16"
    prompt_clicks: str = "all"

    def __post_init__(self) -> None:
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}")
        if self.prompt_clicks not in PROMPT_CLICKS:
            raise ValueError(f"prompt_clicks must be one of {PROMPT_CLICKS}, got {self.prompt_clicks!r}")
        if self.memory_size < 1:
            raise ValueError(f"memory_size must be >= 1, got {self.memory_size}")
        if not isinstance(getattr(torch, self.memory_dtype, None), torch.dtype):
            raise ValueError(f"memory_dtype {self.memory_dtype!r} is not a torch dtype name")
        if self.encoder.img_size % self.encoder.patch_size:
            raise ValueError(
                f"img_size {self.encoder.img_size} is not a multiple of patch_size {self.encoder.patch_size}"
            )

    @classmethod
    def sam_med3d(cls, **overrides: Any) -> MaisConfig:
        """SAM-Med3D's released "vit_b_ori" encoder (92.9 M parameters, ~8 s a 128^3 crop on 2 CPU cores in medim)."""
        encoder = EncoderConfig(
            embed_dim=768, depth=12, num_heads=12, window_size=14, global_attn_indexes=(2, 5, 8, 11)
        )
        return cls(name="sam_med3d", encoder=encoder, **overrides)

    @classmethod
    def light(cls, **overrides: Any) -> MaisConfig:
        """The shipped default: ViT embed 192, depth 6, 6 heads, global attention, 1x1 neck (3.8 M encoder
        parameters); same prompt encoder, decoder and memory interface. Sized so that the whole model stored in
        fp16 (11.6 M parameters, 23 MB) fits the 25 MB the repository allows for shipped weights, and trains from
        scratch within minutes on one GPU."""
        encoder = EncoderConfig(embed_dim=192, depth=6, num_heads=6, window_size=0, neck_kernel_size=1)
        return cls(name="light", encoder=encoder, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["encoder"]["global_attn_indexes"] = list(self.encoder.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MaisConfig:
        """Inverse of `to_dict`; unknown or missing fields raise ValueError naming them."""
        d = dict(d)
        try:
            enc = dict(d.pop("encoder"))
            enc["global_attn_indexes"] = tuple(enc.get("global_attn_indexes", ()))
            d["encoder"] = EncoderConfig(**enc)
            d["memory_attention"] = MemoryAttentionConfig(**d.get("memory_attention", {}))
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid MAIS config {d!r}: {e}") from e


def build_mais(config: MaisConfig, device: torch.device | str | None = None) -> Mais:
    """A Mais model in eval mode with random weights (memory attention's output projection zero: see
    memory_attention.py). device "meta" builds shapes only (no memory, instant)."""
    enc = config.encoder
    grid = enc.img_size // enc.patch_size
    with torch.device(device) if device is not None else contextlib.nullcontext():
        image_encoder = ImageEncoder3D(
            img_size=enc.img_size,
            patch_size=enc.patch_size,
            embed_dim=enc.embed_dim,
            depth=enc.depth,
            num_heads=enc.num_heads,
            mlp_ratio=enc.mlp_ratio,
            out_chans=PROMPT_EMBED_DIM,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            window_size=enc.window_size,
            global_attn_indexes=enc.global_attn_indexes,
            neck_kernel_size=enc.neck_kernel_size,
        )
        # exactly medim's build_sam3D_vit_b_ori prompt encoder and decoder
        prompt_encoder = PromptEncoder3D(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid, grid),
            input_image_size=(enc.img_size,) * 3,
            mask_in_chans=16,
        )
        mask_decoder = MaskDecoder3D(
            num_multimask_outputs=3, transformer_dim=PROMPT_EMBED_DIM, iou_head_depth=3, iou_head_hidden_dim=256
        )
        memory_attention = MemoryAttention(PROMPT_EMBED_DIM, config.memory_size, config.memory_attention)
    return Mais(image_encoder, prompt_encoder, mask_decoder, memory_attention, config).eval()


def save_mais(
    model: Mais,
    path: str | os.PathLike,
    metadata: Mapping[str, Any] | None = None,
    storage_dtype: torch.dtype | None = None,
) -> Path:
    """Write `model` (config, weights, metadata) to `path` atomically: a temporary file in the same folder, then
    os.replace, so a reader never sees a half-written file. metadata: plain values (str, numbers, lists, dicts).
    storage_dtype: e.g. torch.float16 halves the file (shipped weights); `load_mais` casts back to the model's."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if storage_dtype is not None:
        state = {k: v.to(storage_dtype) if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model_state_dict": state,
        "metadata": dict(metadata or {}),
    }
    atomic_torch_save(payload, path)
    logger.info("saved MAIS model (%s, memory %s) to %s", model.config.name, model.config.memory_mode, path)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """write(file) into a temporary file of the same folder, then os.replace: a reader (the server reloading
    published weights, /info reading training stats, a resumed run) sees the old file or the new one, never half
    of one. The folder is created if needed; the temporary file is removed if writing fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(payload: Any, path: str | os.PathLike) -> None:
    """torch.save to `path` through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(payload, f))


def read_mais_file(path: str | os.PathLike) -> dict[str, Any]:
    """The checked payload of a MAIS weights file (format, config, model_state_dict, metadata)."""
    payload = _read_torch_file(path, trusted=False)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        hint = " (an official SAM-Med3D checkpoint? use load_sam_med3d_checkpoint)" if _is_sam_med3d(payload) else ""
        raise WeightsError(f"{path}: not a MAIS weights file (format {found!r}, expected {FORMAT!r}){hint}")
    if payload.get("format_version") != FORMAT_VERSION:
        raise WeightsError(
            f"{path}: MAIS format version {payload.get('format_version')!r}, this code reads {FORMAT_VERSION}"
        )
    for key in ("config", "model_state_dict"):
        if not isinstance(payload.get(key), Mapping):
            raise WeightsError(f"{path}: MAIS weights file has no {key!r} dict")
    return payload


def load_mais(path: str | os.PathLike, device: torch.device | str = "cpu", memory_mode: str | None = None) -> Mais:
    """Build the model the file describes and load its weights strictly; eval mode, on `device`.

    memory_mode: None keeps the file's; any of "none", "sparse", "dense", "both" overrides it (every mode has the
    same weights). Raises WeightsError for a missing file, a file torch cannot read, another format, or a missing,
    unexpected or misshapen key (named).
    """
    payload = read_mais_file(path)
    try:
        config = MaisConfig.from_dict(payload["config"])
        if memory_mode is not None:
            config = dataclasses.replace(config, memory_mode=memory_mode)
    except ValueError as e:
        raise WeightsError(f"{path}: {e}") from e
    model = build_mais(config, device="meta")
    expected = model.state_dict()
    check_state_dict(expected, payload["model_state_dict"], source=str(path))
    # weights stored in a smaller dtype (save_mais storage_dtype) come back in the model's own
    state = {k: v.to(expected[k].dtype) for k, v in payload["model_state_dict"].items()}
    model.load_state_dict(state, strict=True, assign=True)
    logger.info("loaded MAIS model (%s, memory %s) from %s", config.name, config.memory_mode, path)
    return model.to(device).eval()


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
    payload = checkpoint if isinstance(checkpoint, Mapping) else _read_torch_file(checkpoint, trusted=trusted)
    state = payload.get("model_state_dict", payload) if isinstance(payload, Mapping) else payload
    if not _is_sam_med3d(state):
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


def check_state_dict(expected: Mapping[str, Tensor], state: Mapping[str, Any], source: str) -> None:
    """Raise WeightsError naming the first missing, unexpected or misshapen key of `state` against `expected`."""
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{source}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise WeightsError(f"{source}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for k, ref in expected.items():
        value = state[k]
        if not isinstance(value, Tensor):
            raise WeightsError(f"{source}: key {k!r} holds a {type(value).__name__}, not a tensor")
        if value.shape != ref.shape:
            raise WeightsError(
                f"{source}: key {k!r} has shape {tuple(value.shape)}, the model expects {tuple(ref.shape)}"
            )


def _is_sam_med3d(payload: Any) -> bool:
    if not isinstance(payload, Mapping):
        return False
    state = payload.get("model_state_dict", payload)
    return isinstance(state, Mapping) and any(str(k).removeprefix("module.").startswith("mask_decoder.") for k in state)


def _read_torch_file(path: str | os.PathLike, trusted: bool) -> Any:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file")
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except Exception as e:  # torch's unpickler raises many types on a damaged or foreign file
        # torch.save writes a zip archive; a weights_only refusal inside one means pickled non-tensor objects
        if isinstance(e, pickle.UnpicklingError) and not trusted and zipfile.is_zipfile(path):
            raise WeightsError(
                f"{path}: holds pickled objects other than tensors; load it with trusted=True only if you trust its "
                f"source ({str(e).splitlines()[0]})"
            ) from e
        raise WeightsError(
            f"{path}: not a readable torch weights file (damaged or another format; {type(e).__name__})"
        ) from e
