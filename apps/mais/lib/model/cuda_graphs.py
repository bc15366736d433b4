"""The mask decoder replayed as CUDA graphs at inference: one launch a click instead of ~220.

A served click's decoder pass is ~220 small kernels. On the H200 host each costs the host tens of microseconds
to launch while the GPU finishes it in a few, so the pass is bound by the host (benchmarks/RESULTS.md: a later
click kept the GPU busy 2.5 ms of 35-46). A CUDA graph records the kernels once and replays them with one launch.

A graph holds fixed shapes. Between the clicks of a session only the number of prompt tokens changes (the clicks
so far plus SAM-Med3D's padding point); the image embedding, its positional encoding and the dense prompt are
[1, E, 8, 8, 8] always (and the high-resolution features of a model with them, lib.model.high_res_features,
[1, 96, 16^3] and [1, 48, 32^3]). So there is one graph per token count, recorded on its first use and kept for every
later session (at most `max_graphs`, the least recently used dropped first). All graphs share one memory pool:
they are replayed one at a time under a lock and their outputs are copied out before the next replay.

Only batch 1 under inference (no autograd), on CUDA, runs here; `accepts` says so, and the caller runs the
decoder itself otherwise. A recording that fails (a kernel the driver cannot capture) turns the graphs off for
good with a warning: the click then runs the decoder as it always did.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from medim.models.sam_med3d import MaskDecoder3D
from torch import Tensor

from .high_res_features import HighResFeatureMaps, UpscaledContext, decode_with_high_res

logger = logging.getLogger(__name__)

# Token counts a server keeps graphs for; a session's window rarely holds more clicks. A graph keeps its own
# copy of the inputs (2.4 MB); the intermediates are in the pool all graphs share.
MAX_GRAPHS = 64
# Eager passes before a recording: the first ones of a shape choose cuBLAS / cuDNN kernels and allocate their
# workspaces, which must not happen inside the graph.
WARM_UP_PASSES = 2


@dataclass
class _Recording:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]  # the tensors the graph reads (`decode`'s, flat): copy a click's inputs into them
    low_res_logits: Tensor  # the tensor the graph writes


class DecoderGraphs:
    """`decoder`'s single-mask pass as CUDA graphs, one per number of prompt tokens (module docstring)."""

    def __init__(
        self, decoder: MaskDecoder3D, context: UpscaledContext | None = None, max_graphs: int = MAX_GRAPHS
    ) -> None:
        self.decoder = decoder
        self.context = context
        self.max_graphs = max_graphs
        self.enabled = True
        self._recordings: OrderedDict[tuple, _Recording] = OrderedDict()
        self._pool = None  # the memory pool the graphs share, from the first recording on
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """The graphs recorded so far."""
        return len(self._recordings)

    def accepts(self, image_embeddings: Tensor) -> bool:
        """Whether a pass on these [B, E, 8, 8, 8] embeddings may replay a graph: batch 1, CUDA, no autograd."""
        return (
            self.enabled and image_embeddings.is_cuda and image_embeddings.shape[0] == 1 and not torch.is_grad_enabled()
        )

    def __call__(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        sparse: Tensor,
        dense: Tensor,
        high_res: HighResFeatureMaps | None = None,
    ) -> Tensor:
        """The decoder's low-res logits [1, 1, 32, 32, 32] for image_embeddings [1, E, 8, 8, 8], image_pe
        [1, E, 8, 8, 8], sparse prompt embeddings [1, P, E] and dense ones [1, E, 8, 8, 8] (and a model's
        high-resolution features), as `decode(decoder, ...)` computes them."""
        inputs = (image_embeddings, image_pe, sparse, dense, *(high_res or ()))
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        with self._lock:
            recording = self._recordings.get(key)
            if recording is None:
                try:
                    recording = self._record(inputs)
                except RuntimeError as error:
                    self.enabled = False
                    logger.warning("CUDA graphs of the mask decoder turned off, its kernels run one by one: %s", error)
                    return _decode_flat(self.decoder, self.context, inputs)
                self._recordings[key] = recording
                if len(self._recordings) > self.max_graphs:
                    self._recordings.popitem(last=False)
            self._recordings.move_to_end(key)
            for static, given in zip(recording.inputs, inputs):
                static.copy_(given)
            recording.graph.replay()
            return recording.low_res_logits.clone()

    def _record(self, inputs: tuple[Tensor, ...]) -> _Recording:
        static = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream(device=static[0].device)
        side.wait_stream(torch.cuda.current_stream(static[0].device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_PASSES):
                _decode_flat(self.decoder, self.context, static)
        torch.cuda.current_stream(static[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            low_res_logits = _decode_flat(self.decoder, self.context, static)
        self._pool = graph.pool()
        return _Recording(graph, static, low_res_logits)


def decode(
    decoder: MaskDecoder3D,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    high_res: HighResFeatureMaps | None = None,
    context: UpscaledContext | None = None,
) -> Tensor:
    """The decoder's single mask [B, 1, 32, 32, 32] (its second output, a quality estimate for choosing among
    several masks, is for multi-mask output: MAIS asks for one); with `high_res`, the features added in its
    upscaling and the `context` block after them if the model has one (lib.model.high_res_features), else
    medim's decoder as it is."""
    if high_res is not None:
        return decode_with_high_res(decoder, image_embeddings, image_pe, sparse, dense, high_res, context)
    low_res_logits, _ = decoder(
        image_embeddings=image_embeddings,
        image_pe=image_pe,
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return low_res_logits


def _decode_flat(decoder: MaskDecoder3D, context: UpscaledContext | None, inputs: tuple[Tensor, ...]) -> Tensor:
    """`decode` of a graph's flat inputs: the four decoder inputs, then the high-resolution features if any."""
    return decode(decoder, *inputs[:4], tuple(inputs[4:]) or None, context)
