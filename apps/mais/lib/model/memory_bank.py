"""The MAIS memory bank: a FIFO of the N most recent interactions of one segmentation session.

A plain object, not an nn.Module: it holds activations, not parameters. One entry = one interaction (one call
of `Mais.predict`), as in the paper: that interaction's sparse embeddings (its clicks) and dense embedding (its
previous low-res mask), both as the memory attention's write path leaves them (`MemoryAttention.encode`):

    sparse_tokens [B, S, C]  the clicks' prompt-encoder embeddings projected to the memory width C (64)
    sparse_valid  [B, S]     bool, False for padding points (label -1)
    dense_key     [B, T, C]  the previous mask's dense embedding after the dense conv block, projected to the
    dense_value   [B, T, C]  temporal attention's key and value (T = 8^3 = 512 positions)

Why keys and values rather than the raw 384 x 8^3 embedding: everything up to the key/value projection acts on
one slot alone, so caching its output is exactly what projecting the raw embedding at every read would give (a
KV cache), and it is 6x smaller: 2 x 64 x 512 values in fp16 = 131 KB a slot, 7.9 MB at N = 60 per batch
element, against 786 KB / 47 MB for the raw fp32 embedding. The recency of a slot is added at read time (the
attention's age embedding), so an entry never changes once written. Fields the memory mode does not read are
None (mode "none" stores empty entries, so len() still counts interactions).

Entries are never modified in place. During training they keep their autograd graph (the loss of step k reaches
the write path of steps < k). An undo does not edit the bank: the session replays the remaining clicks
(`lib.session.interactive`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

_FIELDS = ("sparse_tokens", "sparse_valid", "dense_key", "dense_value")


@dataclass(frozen=True)
class MemoryEntry:
    """One interaction's memory; shapes in the module docstring, None where the memory mode does not use it."""

    sparse_tokens: Tensor | None = None
    sparse_valid: Tensor | None = None
    dense_key: Tensor | None = None
    dense_value: Tensor | None = None

    @property
    def batch_size(self) -> int | None:
        present = [t for t in self._tensors() if t is not None]
        return present[0].shape[0] if present else None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors() if t is not None)

    def convert(self, dtype: torch.dtype | None) -> MemoryEntry:
        """Floating tensors to `dtype` (None keeps theirs)."""
        if dtype is None:
            return self
        changes = {}
        for name in _FIELDS:
            t = getattr(self, name)
            if t is not None and t.is_floating_point():
                changes[name] = t.to(dtype)
        return dataclasses.replace(self, **changes)

    def _tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, name) for name in _FIELDS)


class MemoryBank:
    """FIFO of at most `capacity` MemoryEntry objects, oldest first; pushing onto a full bank evicts the oldest.

    capacity: N (MaisConfig.memory_size, 60 by default). batch_size: B of every entry (training runs B samples
    side by side, each with its own memory). dtype: storage dtype of floating tensors (float16 by default, see the
    module docstring; None keeps the dtype they come with).
    """

    def __init__(self, capacity: int, batch_size: int = 1, dtype: torch.dtype | None = torch.float16) -> None:
        if capacity < 1:
            raise ValueError(f"memory capacity must be >= 1, got {capacity}")
        if batch_size < 1:
            raise ValueError(f"memory batch_size must be >= 1, got {batch_size}")
        self.capacity = capacity
        self.batch_size = batch_size
        self.dtype = dtype
        self._entries: list[MemoryEntry] = []

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (
            f"MemoryBank(len={len(self)}, capacity={self.capacity}, batch_size={self.batch_size}, "
            f"dtype={self.dtype}, nbytes={self.nbytes()})"
        )

    @property
    def entries(self) -> tuple[MemoryEntry, ...]:
        """Oldest first."""
        return tuple(self._entries)

    def newest_first(self) -> tuple[MemoryEntry, ...]:
        """Newest first: position i holds the memory of age i + 1 (age 0 is the interaction being predicted)."""
        return tuple(reversed(self._entries))

    def push(self, entry: MemoryEntry) -> None:
        """Append one interaction's entry (stored in `dtype`); evicts the oldest entry beyond `capacity`."""
        if entry.batch_size not in (None, self.batch_size):
            raise ValueError(f"entry has batch size {entry.batch_size}, this memory bank holds {self.batch_size}")
        self._entries.append(entry.convert(dtype=self.dtype))
        if len(self._entries) > self.capacity:
            del self._entries[0]

    def nbytes(self) -> int:
        """Bytes held by the entries' tensors."""
        return sum(e.nbytes() for e in self._entries)
