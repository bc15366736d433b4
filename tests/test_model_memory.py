"""lib.model.memory_bank: FIFO order and eviction, storage dtype, size at N = 60."""

from __future__ import annotations

import pytest
import torch

from lib.model.builder import build_mais
from lib.model.config import MaisConfig
from lib.model.memory_bank import MemoryBank, MemoryEntry


def entry(tag: float, batch_size: int = 1, clicks: int = 1) -> MemoryEntry:
    """A recognisable entry: every value equals `tag`."""
    return MemoryEntry(
        sparse_tokens=torch.full((batch_size, clicks + 1, 64), tag),
        sparse_valid=torch.tensor([[True] * clicks + [False]] * batch_size),
        dense_key=torch.full((batch_size, 512, 64), tag),
        dense_value=torch.full((batch_size, 512, 64), -tag),
    )


def tags(bank: MemoryBank) -> list[float]:
    return [e.dense_key[0, 0, 0].item() for e in bank.entries]


def test_fifo_order_and_eviction_at_capacity():
    bank = MemoryBank(capacity=3)
    for t in range(1, 6):
        bank.push(entry(t))
        assert len(bank) == min(t, 3)
    assert tags(bank) == [3, 4, 5]  # oldest first; 1 and 2 evicted
    assert [e.dense_key[0, 0, 0].item() for e in bank.newest_first()] == [5, 4, 3]


def test_push_stores_in_the_bank_dtype_and_checks_the_batch():
    bank = MemoryBank(capacity=2, batch_size=2)
    bank.push(entry(1.5, batch_size=2))
    stored = bank.entries[0]
    assert stored.dense_key.dtype == torch.float16 and stored.sparse_valid.dtype == torch.bool
    assert MemoryBank(2, 2, dtype=None).entries == ()
    with pytest.raises(ValueError, match="batch size 1"):
        bank.push(entry(2.0, batch_size=1))


def test_session_memory_at_n60_is_under_25_mb():
    model = build_mais(MaisConfig.light(memory_mode="both"))
    bank = model.new_memory(batch_size=1)
    sparse = torch.randn(1, 2, 384)  # one click + SAM's padding point
    valid = torch.tensor([[True, False]])
    dense = torch.randn(1, 384, 8, 8, 8)
    with torch.no_grad():
        for _ in range(70):
            bank.push(model.memory_attention.encode(sparse, valid, dense, "both"))
    assert len(bank) == 60
    # 60 x (2 x 64 x 512 fp16 dense + 2 x 64 fp16 sparse + 2 bool) = 7.88 MB
    assert bank.nbytes() == 60 * (2 * 64 * 512 * 2 + 2 * 64 * 2 + 2)
    assert bank.nbytes() <= 25e6
