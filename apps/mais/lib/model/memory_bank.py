"""The MAIS memory bank: a FIFO of the N most recent interactions of one segmentation session.

A plain object, not an nn.Module: it holds activations, not parameters, and the session store copies, truncates
and serialises it. One entry = one interaction (one call of `Mais.predict`), as in the paper: that interaction's
sparse embeddings (its clicks) and dense embedding (its previous low-res mask), both as the memory attention's
write path leaves them (`MemoryAttention.encode`):

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

Entries are never modified in place: `copy()` shares their tensors, which makes an undo snapshot O(N) pointers.
During training the entries keep their autograd graph (the loss of step k reaches the write path of steps < k);
`state_dict()` detaches and moves them to the CPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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

    def convert(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> MemoryEntry:
        """Floating tensors to `dtype` (None keeps theirs), all tensors to `device` (None keeps theirs)."""
        changes = {}
        for name in _FIELDS:
            t = getattr(self, name)
            if t is not None:
                changes[name] = t.to(
                    device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None
                )
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

    def truncate(self, length: int) -> None:
        """Keep the `length` oldest entries, dropping the newer ones (undo of the last len - length pushes).

        An undo across an eviction cannot bring the evicted entry back: take a `copy()` before a push to undo it
        exactly in every case.
        """
        if not 0 <= length <= len(self._entries):
            raise ValueError(f"cannot truncate a memory bank of {len(self)} entries to {length}")
        del self._entries[length:]

    def clear(self) -> None:
        self._entries.clear()

    def copy(self) -> MemoryBank:
        """An independent bank with the same entries (entries are immutable, so their tensors are shared)."""
        other = MemoryBank(self.capacity, self.batch_size, self.dtype)
        other._entries = list(self._entries)
        return other

    def to(self, device: torch.device | str) -> MemoryBank:
        """A copy with every tensor on `device`."""
        other = MemoryBank(self.capacity, self.batch_size, self.dtype)
        other._entries = [e.convert(device=device) for e in self._entries]
        return other

    def nbytes(self) -> int:
        """Bytes held by the entries' tensors."""
        return sum(e.nbytes() for e in self._entries)

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of ints, strings and CPU tensors (detached), loadable with torch.load(weights_only=True)."""
        return {
            "capacity": self.capacity,
            "batch_size": self.batch_size,
            "dtype": None if self.dtype is None else str(self.dtype).removeprefix("torch."),
            "entries": [
                {name: None if t is None else t.detach().cpu() for name, t in zip(_FIELDS, e._tensors())}
                for e in self._entries
            ],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str | None = None) -> MemoryBank:
        """Inverse of `state_dict()`; tensors go to `device` (None: CPU)."""
        dtype = None if state["dtype"] is None else getattr(torch, state["dtype"])
        bank = cls(int(state["capacity"]), int(state["batch_size"]), dtype)
        entries: Sequence[dict[str, Tensor | None]] = state["entries"]
        if len(entries) > bank.capacity:
            raise ValueError(f"memory state holds {len(entries)} entries, more than its capacity {bank.capacity}")
        for fields in entries:
            unknown = set(fields) - set(_FIELDS)
            if unknown:
                raise ValueError(f"memory state has unknown entry fields {sorted(unknown)}")
            bank.push(MemoryEntry(**fields).convert(device=device))
        return bank
