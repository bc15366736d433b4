"""The MAIS network's configuration: what `lib.model.builder.build_mais` builds and every weights file stores.

Plain dataclasses without torch, so that option schemas (the app's `--conf`, the trainer, the training command
line) can name the memory modes and networks without loading the network code.

    cfg = MaisConfig.light()                 # shipped default: light encoder; or MaisConfig.sam_med3d()
    cfg = MaisConfig.light(memory_mode="dense", memory_size=60)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

# "none": SAM-Med3D alone; the others add the memory attention's dense term (lib.model.memory_attention)
MemoryMode = Literal["none", "sparse", "dense", "both"]
MEMORY_MODES: tuple[str, ...] = get_args(MemoryMode)
# which clicks the prompt encoder gets at each interaction step (MaisConfig.prompt_clicks)
PromptClicks = Literal["all", "latest"]
PROMPT_CLICKS: tuple[str, ...] = get_args(PromptClicks)
# floating dtypes the memory bank may store its entries in (torch dtype names)
MEMORY_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class MemoryAttentionConfig:
    """Sizes of the memory attention (reasons in lib/model/memory_attention.py's docstring)."""

    dim: int = 64
    num_heads: int = 4
    ffn_ratio: int = 2

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"memory dim {self.dim} is not divisible by num_heads {self.num_heads}")


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
    refinement: the full-resolution head (lib.model.refinement). high_res_features: the decoder's high-resolution
    image features; high_res_prompts: with the step's clicks and previous mask drawn into them; high_res_context:
    with a residual convolution block on the decoder's 32^3 features after them (lib.model.high_res_features).
    """

    name: str
    encoder: EncoderConfig
    memory_attention: MemoryAttentionConfig = field(default_factory=MemoryAttentionConfig)
    memory_mode: str = "both"
    memory_size: int = 60
    memory_dtype: str = "float16"
    prompt_clicks: str = "all"
    refinement: bool = False
    high_res_features: bool = False
    high_res_prompts: bool = False
    high_res_context: bool = False

    def __post_init__(self) -> None:
        if self.high_res_prompts and not self.high_res_features:
            raise ValueError("high_res_prompts draws the prompts into the high-resolution features: needs them")
        if self.high_res_context and not self.high_res_features:
            raise ValueError("high_res_context mixes the decoder's high-resolution features: needs them")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}")
        if self.prompt_clicks not in PROMPT_CLICKS:
            raise ValueError(f"prompt_clicks must be one of {PROMPT_CLICKS}, got {self.prompt_clicks!r}")
        if self.memory_size < 1:
            raise ValueError(f"memory_size must be >= 1, got {self.memory_size}")
        if self.memory_dtype not in MEMORY_DTYPES:
            raise ValueError(f"memory_dtype must be one of {MEMORY_DTYPES}, got {self.memory_dtype!r}")
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


# The networks a training run can build from scratch (the training command line's --encoder)
NetworkName = Literal["light", "sam_med3d"]
NETWORKS = {"light": MaisConfig.light, "sam_med3d": MaisConfig.sam_med3d}
