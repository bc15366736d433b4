"""MAIS memory attention: turns the memory of past interactions into a dense term added to the image embedding.

The paper (arXiv 2505.07511) gives the structure but no sizes: self-attention over the memory stacks producing
a dense output added to the image embedding before the mask decoder, cross-attention between sparse and dense
memories, convolutional blocks for the dense stack. Ours, with C = 64 (memory width), 4 heads of 16, T = 8^3 = 512
positions, N <= 60 memory slots, S clicks a slot, E = 384 (SAM-Med3D's prompt / embedding width):

write path, once per interaction (`encode`, its output is the MemoryEntry pushed into the bank):
    sparse: prompt-encoder click embeddings [B, S, E] -> Linear(E, C)                           -> [B, S, C]
    dense:  prompt-encoder mask embedding [B, E, 8, 8, 8] -> conv 1x1 (E -> C) -> residual conv block
            (LayerNorm, GELU, depthwise 3^3 conv) -> conv 1x1 (C -> 2C) = temporal key | value    -> [B, T, C] x 2

read path, every interaction (`forward`):
    x0 = LN(conv 1x1 (E -> C) of the image embedding) + Linear(E, C) of the dense positional encoding  [B, T, C]
    1. dense memory self-attention ("dense", "both"): at every position, the stack [current; N slots] with a
       learned age embedding (0 = current, 1 = newest slot, ... N) is attended by the query of x0. This is the
       current token's row of a self-attention over the stack; the slots' own rows are never read, so they are
       not computed: O(N) a position.                                                    x1 = x0 + attn
    2. sparse memory self-attention ("sparse", "both"): all click tokens of the current interaction and the N
       slots (+ age embedding) and one learned null token (so that a set with no click still has a valid key)
       attend to each other (one pre-LN layer).
    3. sparse -> dense cross-attention ("sparse", "both"): the 512 positions attend to those tokens, so every
       position sees every past click with its label and place.                          x2 = x1 + attn
    4. convolutional feed-forward: depthwise 3^3 conv, LN, Linear(C, 2C), GELU, Linear(2C, C)  x3 = x2 + ffn
    5. LN, Linear(C, E), zero-initialised: an untrained memory adds exactly 0, so fine-tuning starts from the
       SAM-Med3D baseline.                                                            -> [B, E, 8, 8, 8]

Why these sizes: C = 64 keeps a slot at 2 x 64 x 512 fp16 values = 131 KB (7.9 MB at N = 60, target <= 25 MB)
and the per-click work at N = 60 near 0.2 GFLOP, mostly the three 384 -> 64 input projections; measured at N = 60
it adds ~14 ms to a click on 2 CPU cores (46 ms in all) and ~3 ms on an H200 (6.6 ms in all), see
benchmarks/RESULTS.md. 0.21 M parameters (the mask decoder has 7.6 M) suit the paper's small-data regime. 4 heads
of 16 let heads specialise (recent vs old slots, positive vs negative clicks). One layer each: the mask decoder's
two-way transformer after it does the deeper mixing. All modes share one set of weights (a "both" model can be
evaluated as "dense", "sparse" or "none"); a branch the mode skips gets no gradient, so a multi-GPU trainer of
"sparse" or "dense" needs DDP's find_unused_parameters=True.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from medim.models.sam_med3d import LayerNorm3d
from torch import Tensor, nn

from .config import MemoryAttentionConfig
from .memory_bank import MemoryEntry


@dataclass
class MemoryAttentionWeights:
    """Attention weights of one `MemoryAttention.forward` (None for a branch the mode skips).

    dense: [B, T, heads, 1 + N] over [current, newest slot, ..., oldest slot].
    sparse_self: [B, heads, K, K] and sparse_cross: [B, heads, T, K] over the K sparse tokens [null, current
    interaction's clicks, newest slot's clicks, ..., oldest slot's clicks] (padding points get weight 0).
    """

    dense: Tensor | None = None
    sparse_self: Tensor | None = None
    sparse_cross: Tensor | None = None


def uses_sparse(mode: str) -> bool:
    return mode in ("sparse", "both")


def uses_dense(mode: str) -> bool:
    return mode in ("dense", "both")


def _attend(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention that also returns its weights (SDPA does not; these are small: K <= ~200 keys).

    q: [..., Lq, d], k and v: [..., Lk, d], key_valid: bool broadcastable to [..., Lq, Lk] (True = attend).
    Returns out [..., Lq, d] and weights [..., Lq, Lk].
    """
    logits = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid, float("-inf"))
    weights = logits.softmax(dim=-1)
    return weights @ v, weights


def _prepend(current: Tensor, memory: Sequence[Tensor], dim: int, stack: bool = True) -> Tensor:
    """Stack (or concatenate) [current, *memory] along `dim` in current's dtype.

    The memory slots share their storage dtype (fp16) and are joined in one call, then cast once (casting slot by
    slot would cost N small kernels a click). Autocast is off for the joins: it refuses fp16 inputs under bf16.
    """
    join = torch.stack if stack else torch.cat
    with torch.autocast(current.device.type, enabled=False):
        parts = [current.unsqueeze(dim) if stack else current]
        if memory:
            parts.append(join(list(memory), dim=dim).to(current.dtype))
        return torch.cat(parts, dim=dim)


class _MultiHeadAttention(nn.Module):
    """Plain multi-head attention over token sequences, returning its weights."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, q: Tensor, kv: Tensor, key_valid: Tensor) -> tuple[Tensor, Tensor]:
        """q: [B, Lq, C], kv: [B, Lk, C], key_valid: [B, Lk] bool. Returns [B, Lq, C], weights [B, h, Lq, Lk]."""
        out, weights = _attend(
            self._heads(self.q_proj(q)),
            self._heads(self.k_proj(kv)),
            self._heads(self.v_proj(kv)),
            key_valid[:, None, None, :],
        )
        return self.out_proj(out.transpose(1, 2).flatten(2)), weights

    def _heads(self, x: Tensor) -> Tensor:
        B, L, C = x.shape
        return x.view(B, L, self.num_heads, C // self.num_heads).transpose(1, 2)  # [B, h, L, C/h]


class MemoryAttention(nn.Module):
    """See the module docstring. embed_dim: E (384); memory_size: N, the largest age the age embeddings cover."""

    def __init__(self, embed_dim: int, memory_size: int, config: MemoryAttentionConfig | None = None):
        super().__init__()
        config = config or MemoryAttentionConfig()
        C = config.dim
        self.num_heads = config.num_heads
        self.memory_size = memory_size
        # write path
        self.sparse_in = nn.Linear(embed_dim, C)
        self.dense_in = nn.Conv3d(embed_dim, C, kernel_size=1)
        self.dense_block = nn.Sequential(LayerNorm3d(C), nn.GELU(), nn.Conv3d(C, C, kernel_size=3, padding=1, groups=C))
        self.dense_kv = nn.Conv3d(C, 2 * C, kernel_size=1)
        # read path
        self.image_in = nn.Conv3d(embed_dim, C, kernel_size=1)
        self.image_norm = LayerNorm3d(C)
        self.pos_in = nn.Linear(embed_dim, C)
        self.dense_norm = nn.LayerNorm(C)
        self.dense_q = nn.Linear(C, C)
        self.dense_out = nn.Linear(C, C)
        self.dense_age_key = nn.Parameter(torch.randn(memory_size + 1, C) * 0.02)
        self.dense_age_value = nn.Parameter(torch.randn(memory_size + 1, C) * 0.02)
        self.sparse_age = nn.Parameter(torch.randn(memory_size + 1, C) * 0.02)
        self.sparse_null = nn.Parameter(torch.randn(1, C) * 0.02)
        self.sparse_norm = nn.LayerNorm(C)
        self.sparse_self_attn = _MultiHeadAttention(C, config.num_heads)
        self.cross_norm = nn.LayerNorm(C)
        self.cross_attn = _MultiHeadAttention(C, config.num_heads)
        self.ffn_conv = nn.Conv3d(C, C, kernel_size=3, padding=1, groups=C)
        self.ffn_norm = nn.LayerNorm(C)
        self.ffn = nn.Sequential(nn.Linear(C, config.ffn_ratio * C), nn.GELU(), nn.Linear(config.ffn_ratio * C, C))
        self.out_norm = nn.LayerNorm(C)
        self.out_proj = nn.Linear(C, embed_dim)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def encode(
        self, sparse_embeddings: Tensor, sparse_valid: Tensor, dense_embeddings: Tensor, mode: str
    ) -> MemoryEntry:
        """Write path: this interaction's prompt embeddings -> its MemoryEntry (fields the mode reads, else None).

        sparse_embeddings [B, S, E], sparse_valid [B, S] bool, dense_embeddings [B, E, D, H, W].
        """
        entry = MemoryEntry()
        if uses_sparse(mode):
            entry = MemoryEntry(sparse_tokens=self.sparse_in(sparse_embeddings), sparse_valid=sparse_valid)
        if uses_dense(mode):
            f = self.dense_in(dense_embeddings)
            f = f + self.dense_block(f)
            key, value = self.dense_kv(f).flatten(2).transpose(1, 2).chunk(2, dim=-1)  # [B, T, C] each
            entry = MemoryEntry(entry.sparse_tokens, entry.sparse_valid, key, value)
        return entry

    def forward(
        self,
        image_embeddings: Tensor,
        image_pe: Tensor,
        current: MemoryEntry,
        memory: Sequence[MemoryEntry],
        mode: str,
    ) -> tuple[Tensor, MemoryAttentionWeights]:
        """Read path. image_embeddings [B, E, D, H, W], image_pe [1, E, D, H, W] (the prompt encoder's dense PE),
        current: this interaction's entry (age 0), memory: the bank's entries newest first (ages 1..N).

        Returns the dense memory term [B, E, D, H, W] to add to the image embedding, and the attention weights.
        """
        if len(memory) > self.memory_size:
            raise ValueError(f"{len(memory)} memory slots, the age embeddings cover {self.memory_size}")
        needed = (("sparse_tokens",) if uses_sparse(mode) else ()) + (("dense_key",) if uses_dense(mode) else ())
        if any(getattr(slot, name) is None for slot in memory for name in needed):
            raise ValueError(f"memory entries were written in another memory mode than {mode!r}: start a new memory")
        B, E, D, H, W = image_embeddings.shape
        x = self.image_norm(self.image_in(image_embeddings)).flatten(2).transpose(1, 2)  # [B, T, C]
        x = x + self.pos_in(image_pe.flatten(2).transpose(1, 2))
        weights = MemoryAttentionWeights()
        if uses_dense(mode):
            attn, weights.dense = self._dense_memory_attention(x, current, memory)
            x = x + attn
        if uses_sparse(mode):
            tokens, valid, weights.sparse_self = self._sparse_memory_attention(current, memory, B)
            attn, weights.sparse_cross = self.cross_attn(self.cross_norm(x), tokens, valid)
            x = x + attn
        C = x.shape[-1]
        local = self.ffn_conv(x.transpose(1, 2).reshape(B, C, D, H, W)).flatten(2).transpose(1, 2)
        x = x + self.ffn(self.ffn_norm(local))
        out = self.out_proj(self.out_norm(x))  # [B, T, E]
        return out.transpose(1, 2).reshape(B, E, D, H, W), weights

    def _dense_memory_attention(
        self, x: Tensor, current: MemoryEntry, memory: Sequence[MemoryEntry]
    ) -> tuple[Tensor, Tensor]:
        """x [B, T, C] queries; keys/values: [current, memory...] per position. Returns [B, T, C], [B, T, h, 1+N]."""
        B, T, C = x.shape
        h = self.num_heads
        n = 1 + len(memory)
        keys = _prepend(current.dense_key, [s.dense_key for s in memory], dim=2) + self.dense_age_key[:n]  # [B,T,n,C]
        values = _prepend(current.dense_value, [s.dense_value for s in memory], dim=2) + self.dense_age_value[:n]
        q = self.dense_q(self.dense_norm(x)).view(B, T, h, 1, C // h)
        out, weights = _attend(
            q, keys.view(B, T, n, h, C // h).transpose(2, 3), values.view(B, T, n, h, C // h).transpose(2, 3)
        )  # [B, T, h, 1, C/h], [B, T, h, 1, n]
        return self.dense_out(out.reshape(B, T, C)), weights.squeeze(3)

    def _sparse_memory_attention(
        self, current: MemoryEntry, memory: Sequence[MemoryEntry], batch_size: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention over [null, current clicks, slot clicks newest first]: tokens [B, K, C], valid [B, K]."""
        slots = [current, *memory]
        null = self.sparse_null.expand(batch_size, -1, -1)
        lengths = [s.sparse_tokens.shape[1] for s in slots]
        # ages per token built without a host-device sync (output_size given): one gather, not a loop of adds
        ages = torch.arange(len(slots), device=null.device).repeat_interleave(
            torch.tensor(lengths, device=null.device), output_size=sum(lengths)
        )
        clicks = _prepend(current.sparse_tokens, [s.sparse_tokens for s in memory], dim=1, stack=False)
        clicks = clicks.to(null.dtype) + self.sparse_age[ages]
        tokens = torch.cat([null, clicks], dim=1)
        valid = torch.cat(
            [torch.ones(batch_size, 1, dtype=torch.bool, device=null.device)] + [s.sparse_valid for s in slots], dim=1
        )
        normed = self.sparse_norm(tokens)
        attn, weights = self.sparse_self_attn(normed, normed, valid)
        return tokens + attn, valid, weights
