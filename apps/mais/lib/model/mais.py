"""The composed MAIS model: SAM-Med3D's encoder, prompt encoder and mask decoder plus a memory attention.

Use (the infer task and the trainer call exactly this; build it with `lib.model.builder`):

    emb = model.embed_image(volume)              # [B, 1, 128, 128, 128] normalised -> [B, 384, 8, 8, 8]
    high_res = model.high_res_features(volume)   # None, or the crop's part of the decoder's high-res features
    memory = model.new_memory(batch_size=B)      # empty MemoryBank, FIFO of cfg.memory_size interactions
    out = model.predict(emb, point_coords, point_labels, prev_low_res_logits, memory, high_res)
    memory.push(out.memory_entry)                # the CALLER pushes, once per interaction step
    logits = model.mask_logits(out.low_res_logits, volume, point_coords, point_labels)  # [B, 1, 128^3], > 0: mask

`predict` never changes the memory: the caller pushes the returned entry when the interaction is committed (one
interaction step = one entry), in training and inference alike. So a prediction can be recomputed or discarded
without touching the session. `lib.model.interaction` is the step every caller runs.

Full-resolution refinement (MaisConfig.refinement): `mask_logits` upsamples the decoder's logits and, with the
head on, adds lib.model.refinement's residual. High-resolution features (MaisConfig.high_res_features): the
decoder's upscaling adds the crop's own features at strides 8 and 4, computed once a crop, or with
MaisConfig.high_res_prompts finished every step from the crop's cells and the step's clicks and previous mask
drawn at 32^3, and with MaisConfig.high_res_context mixed over a neighbourhood of cells before the mask is read
from them (lib.model.high_res_features). With both off (and memory "none") the network is SAM-Med3D's.

Memory modes (MaisConfig.memory_mode): "none" is exactly SAM-Med3D (the prompt encoder and mask decoder of
medim on the image embedding, memory ignored), "sparse" / "dense" / "both" add the memory attention's dense term
to the image embedding before the mask decoder (see memory_attention.py). All modes share one set of weights:
`load_mais(path, memory_mode=...)` or `model.config = dataclasses.replace(model.config, memory_mode=...)` switches
(with a new memory: entries hold only what their mode reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from medim.models.sam_med3d import MaskDecoder3D, PromptEncoder3D
from torch import Tensor, nn

from .config import MaisConfig
from .cuda_graphs import DecoderGraphs, decode
from .high_res_features import HighResFeatureMaps, HighResFeatures, UpscaledContext, prompt_maps
from .image_encoder import ImageEncoder3D
from .memory_attention import MemoryAttention, MemoryAttentionWeights
from .memory_bank import MemoryBank, MemoryEntry
from .prompts import embed_prompts
from .refinement import MaskRefinement


@dataclass
class MaisOutput:
    """What one `Mais.predict` returns.

    low_res_logits [B, 1, 32, 32, 32]: mask logits at 1/4 resolution (feed back as prev_low_res_logits).
    memory_entry: this interaction's memory, for `MemoryBank.push`.
    attention: the memory attention's weights (None in mode "none").
    """

    low_res_logits: Tensor
    memory_entry: MemoryEntry
    attention: MemoryAttentionWeights | None


class Mais(nn.Module):
    """SAM-Med3D + memory attention. Parts are built by `lib.model.builder.build_mais`; `config` is its MaisConfig."""

    def __init__(
        self,
        image_encoder: ImageEncoder3D,
        prompt_encoder: PromptEncoder3D,
        mask_decoder: MaskDecoder3D,
        memory_attention: MemoryAttention,
        config: MaisConfig,
        refinement: MaskRefinement | None = None,
        high_res: HighResFeatures | None = None,
    ) -> None:
        super().__init__()
        if (refinement is not None) != config.refinement:
            raise ValueError(f"config.refinement is {config.refinement}, the refinement head is {refinement}")
        if (high_res is not None) != config.high_res_features:
            raise ValueError(f"config.high_res_features is {config.high_res_features}, the module is {high_res}")
        if high_res is not None and (high_res.prompt_4 is not None) != config.high_res_prompts:
            raise ValueError(f"config.high_res_prompts is {config.high_res_prompts}, the module's differ")
        if high_res is not None and (high_res.context is not None) != config.high_res_context:
            raise ValueError(f"config.high_res_context is {config.high_res_context}, the module's differs")
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.memory_attention = memory_attention
        self.refinement = refinement
        self.high_res = high_res
        self.config = config
        self.decoder_graphs: DecoderGraphs | None = None  # `use_cuda_graphs`
        self._dense_pe: tuple[tuple, Tensor] | None = None  # (what it was computed from, the encoding)

    @property
    def memory_mode(self) -> str:
        return self.config.memory_mode

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def use_cuda_graphs(self) -> None:
        """Replay the mask decoder of batch-1 inference on CUDA as CUDA graphs (lib.model.cuda_graphs): what a
        served click runs. Training and batches run it as before."""
        self.decoder_graphs = DecoderGraphs(self.mask_decoder, self._context())

    def dense_pe(self) -> Tensor:
        """The prompt encoder's positional encoding of the embedding grid [1, E, 8, 8, 8]: a function of one
        fixed buffer, so computed once (~20 kernels a click otherwise) and again only when the buffer changes
        (a load, a move to another device). A plain tensor without grad, so that training and inference can
        both use it."""
        gaussian = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        source = (gaussian.device, gaussian.data_ptr(), gaussian._version)
        if self._dense_pe is None or self._dense_pe[0] != source:
            with torch.inference_mode(False), torch.no_grad():
                self._dense_pe = (source, self.prompt_encoder.get_dense_pe())
        return self._dense_pe[1]

    def embed_image(self, volume: Tensor) -> Tensor:
        """volume [B, 1, S, S, S] (S = 128, normalised as SAM-Med3D expects) -> embedding [B, E, S/16, S/16, S/16]."""
        return self.image_encoder(volume)

    def high_res_features(self, volume: Tensor) -> HighResFeatureMaps | Tensor | None:
        """What the crop volume [B, 1, S, S, S] gives the decoder's high-resolution features, once a crop like the
        embedding: the features themselves (stride 8 [B, 96, S/8, ...], stride 4 [B, 48, S/4, ...]), or for a
        model with high_res_prompts the cells [B, 16, S/4, S/4, S/4] that `predict` finishes with each step's
        prompt; None for a model without them."""
        if self.high_res is None:
            return None
        cells = self.high_res.image_cells(volume)
        return cells if self.config.high_res_prompts else self.high_res(cells)

    def new_memory(self, batch_size: int = 1, dtype: torch.dtype | None = None) -> MemoryBank:
        """Empty memory bank for `batch_size` sessions side by side.

        dtype None: the config's memory_dtype (float16, what a serving session stores); a trainer may pass
        torch.float32 to keep full precision in the graph (the cast to float16 is differentiable too).
        """
        return MemoryBank(
            self.config.memory_size,
            batch_size,
            dtype if dtype is not None else getattr(torch, self.config.memory_dtype),
        )

    def predict(
        self,
        image_embeddings: Tensor,
        point_coords: Tensor,
        point_labels: Tensor,
        prev_low_res_logits: Tensor | None = None,
        memory: MemoryBank | None = None,
        high_res: HighResFeatureMaps | Tensor | None = None,
    ) -> MaisOutput:
        """One interaction: prompt encoder, memory attention, mask decoder (no upsampling, no memory update).

        image_embeddings [B, E, 8, 8, 8] from `embed_image`.
        point_coords [B, P, 3] float: (d0, d1, d2) voxel indices in the 128^3 crop, SAM-Med3D's convention (its
            axis quirk is baked into the released weights: do not reorder). P may be 0 (a mask-only step).
        point_labels [B, P] int: 1 positive, 0 negative, -1 padding (rows of a batch with fewer clicks).
        prev_low_res_logits [B, 1, 32, 32, 32] logits of the previous step, or None (first step).
        memory: the session's MemoryBank (batch size B), or None for an empty one; read only.
        high_res: `high_res_features` of the crops, for (and only for) a model with them (with high_res_prompts:
            cells, finished here with this step's prompt drawn in).
        """
        B = image_embeddings.shape[0]
        if point_coords.shape[:2] != point_labels.shape or point_coords.shape[0] != B or point_coords.shape[-1] != 3:
            raise ValueError(
                f"point_coords {tuple(point_coords.shape)} / point_labels {tuple(point_labels.shape)} do not match "
                f"[B={B}, P, 3] / [B, P]"
            )
        if memory is not None and memory.batch_size != B:
            raise ValueError(f"memory bank holds batch size {memory.batch_size}, the image embeddings have {B}")
        if (high_res is not None) != self.config.high_res_features:
            raise ValueError(
                f"this model {'needs' if self.config.high_res_features else 'has no'} high-resolution features "
                f"(MaisConfig.high_res_features {self.config.high_res_features}); got {type(high_res).__name__}"
            )
        sparse, dense = embed_prompts(self.prompt_encoder, point_coords.float(), point_labels, prev_low_res_logits)
        image_pe = self.dense_pe()
        mode = self.memory_mode
        if mode == "none":
            entry, attention, src = MemoryEntry(), None, image_embeddings
        else:
            # the prompt encoder appends one padding point (label -1) to the P clicks
            valid = torch.cat([point_labels != -1, point_labels.new_zeros(B, 1, dtype=torch.bool)], dim=1)
            entry = self.memory_attention.encode(sparse, valid, dense, mode)
            slots = memory.newest_first() if memory is not None else ()
            memory_term, attention = self.memory_attention(image_embeddings, image_pe, entry, slots, mode)
            src = image_embeddings + memory_term
        features = self._finish_high_res(high_res, point_coords, point_labels, prev_low_res_logits)
        if self.decoder_graphs is not None and self.decoder_graphs.accepts(src):
            low_res_logits = self.decoder_graphs(src, image_pe, sparse, dense, features)
        else:
            low_res_logits = decode(self.mask_decoder, src, image_pe, sparse, dense, features, self._context())
        return MaisOutput(low_res_logits, entry, attention)

    def _context(self) -> UpscaledContext | None:
        """The decoder's context block at 32^3 (MaisConfig.high_res_context), None for a model without one."""
        return None if self.high_res is None else self.high_res.context

    def _finish_high_res(
        self,
        high_res: HighResFeatureMaps | Tensor | None,
        point_coords: Tensor,
        point_labels: Tensor,
        prev_low_res_logits: Tensor | None,
    ) -> HighResFeatureMaps | None:
        """This step's high-resolution features: `high_res_features` as they are, or its cells finished with the
        step's prompt for a model with high_res_prompts."""
        if not self.config.high_res_prompts:
            return high_res
        size = high_res.shape[-1]
        prompt = prompt_maps(point_coords, point_labels, prev_low_res_logits, size, self.img_size)
        return self.high_res(high_res, prompt.to(high_res.dtype))

    def forward(self, *args, **kwargs) -> MaisOutput:
        """Same as `predict` (so that module hooks and wrappers such as DDP see the trainable path)."""
        return self.predict(*args, **kwargs)

    def upsample_logits(self, low_res_logits: Tensor) -> Tensor:
        """[B, 1, 32, 32, 32] -> [B, 1, 128, 128, 128] logits, trilinear as SAM-Med3D (threshold at 0)."""
        return F.interpolate(low_res_logits, size=(self.img_size,) * 3, mode="trilinear", align_corners=False)

    def mask_logits(
        self, low_res_logits: Tensor, volume: Tensor | None, point_coords: Tensor, point_labels: Tensor
    ) -> Tensor:
        """The step's mask logits [B, 1, 128, 128, 128] (mask = logits > 0): the decoder's low_res_logits
        [B, 1, 32, 32, 32] upsampled, plus the refinement head's residual when the model has one, which sees the
        crop's volume [B, 1, 128, 128, 128] (the encoder's input; None will do without a head) and the prompt's
        clicks [B, P, 3] / [B, P]."""
        logits = self.upsample_logits(low_res_logits)
        if self.refinement is None:
            return logits
        return logits + self.refinement(volume, logits, point_coords, point_labels)
