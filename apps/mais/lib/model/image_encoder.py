"""SAM-Med3D's image encoder (medim's `ImageEncoderViT3D`) with an exact, faster forward pass.

`ImageEncoder3D` subclasses medim's encoder, so it has the same parameters and state_dict keys (an official
SAM-Med3D checkpoint loads into it unchanged); only `forward` differs:

    volume [B, 1, 128, 128, 128] (normalised) -> image embedding [B, out_chans, 8, 8, 8]

Why the released encoder is slow: 8 of its 12 blocks use window attention with window_size=14 on an 8^3 token
grid, so medim zero-pads the grid to one 14^3 window and runs attention over 2744 tokens, 2232 of them padding,
for queries and keys alike (about 41 GFLOP a block against 8 for global attention over the 512 real tokens).
The padding tokens are zeros after norm1, so their keys and values are just the qkv biases; only the decomposed
relative-position bias differs between padded key positions. So, for the 512 real queries only:

    sum over padded keys j of exp(q.k_pad * s + bias_ij) = exp(q.k_pad * s) * sum_j exp(bias_ij)

and, the bias being a sum of terms over key coordinates (see `_rel_pos_bias` for medim's exact, quirky form),
the sum over the padded set 14^3 \\ 8^3 splits into sums of products of per-axis sums, all positive, so its log
is computed stably with logsumexp and no cancellation. The 2232 padded keys then become ONE extra key
(k = qkv bias, v = qkv bias) whose additive bias is that log-sum: attention over 513 keys, computed with
`scaled_dot_product_attention` and the relative-position bias as `attn_mask`. Global blocks use the same SDPA
call with 512 keys. Queries of padding tokens are never computed (medim discards them anyway).

Measured (benchmarks/RESULTS.md): max abs diff to medim's forward ~5e-6 in fp32 on random weights (1e-4 tested),
13x faster on 2 CPU cores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from medim.models.sam_med3d import Block3D, ImageEncoderViT3D, get_rel_pos
from torch import Tensor, nn


class ImageEncoder3D(ImageEncoderViT3D):
    """medim's SAM-Med3D ViT encoder; `forward` is the fast exact path, `forward_reference` is medim's own.

    neck_kernel_size: 3 is medim's (and the checkpoint's) neck; another size replaces the neck's second conv
    under the same state_dict key, for light configurations.
    """

    def __init__(self, *args, neck_kernel_size: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if neck_kernel_size != 3:
            channels = self.neck[2].out_channels
            self.neck[2] = nn.Conv3d(channels, channels, neck_kernel_size, padding=neck_kernel_size // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, 1, S, S, S] normalised volume (S = img_size). Returns [B, out_chans, S/16, S/16, S/16]."""
        x = self.patch_embed(x)  # [B, D, H, W, C]
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block_forward(block, x)
        return self.neck(x.permute(0, 4, 1, 2, 3))

    def forward_reference(self, x: Tensor) -> Tensor:
        """medim's forward (pads windowed blocks to 14^3 tokens); kept for tests and benchmarks."""
        return super().forward(x)


def block_forward(block: Block3D, x: Tensor) -> Tensor:
    """One medim `Block3D` on x [B, D, H, W, C], equal to `block(x)` but without padding work.

    Handles cubic grids, qkv with bias, global blocks (window_size 0) and windowed blocks with relative positions
    whose single window covers the whole grid (window_size >= D: SAM-Med3D's 14 on 8^3). Other shapes never occur
    in our configs; they take medim's own path.
    """
    B, D, H, W, C = x.shape
    window = block.window_size
    attn = block.attn
    if not D == H == W or attn.qkv.bias is None or (window and (window < D or not attn.use_rel_pos)):
        return block(x)
    num_heads = attn.num_heads
    L = D * H * W
    qkv = attn.qkv(block.norm1(x).reshape(B, L, C)).reshape(B, L, 3, num_heads, C // num_heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, head_dim]

    bias = None
    if attn.use_rel_pos:
        q_bias = attn.qkv.bias[:C].to(q.dtype).reshape(num_heads, -1)
        bias, pad_log_mass = _rel_pos_bias(q, q_bias, D, window, attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w)
        if pad_log_mass is not None:
            # All padded keys share k and v (the qkv biases of a zero token): one extra key carries their mass.
            k_bias, v_bias = attn.qkv.bias.to(k.dtype).reshape(3, num_heads, 1, -1)[1:]
            k = torch.cat([k, k_bias.expand(B, -1, -1, -1)], dim=2)
            v = torch.cat([v, v_bias.expand(B, -1, -1, -1)], dim=2)
            bias = torch.cat([bias, pad_log_mass.unsqueeze(-1)], dim=-1)
        bias = bias.to(q.dtype)

    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # scale 1/sqrt(head_dim) = attn.scale
    out = attn.proj(out.transpose(1, 2).reshape(B, D, H, W, C))
    x = x + out
    return x + block.mlp(block.norm2(x))


def _rel_pos_bias(
    q: Tensor,
    q_bias: Tensor,
    grid: int,
    window: int,
    rel_pos_d: Tensor,
    rel_pos_h: Tensor,
    rel_pos_w: Tensor,
) -> tuple[Tensor, Tensor | None]:
    """medim's decomposed relative-position bias for the real tokens of a cubic grid, quirk included.

    medim's `add_decomposed_rel_pos` broadcasts its 5-D per-axis terms into the 7-D attention map
    [B, qd, qh, qw, kd, kh, kw] as `rel_d[:, :, :, :, None, None]`, `rel_h[:, :, :, None, :, None]` and
    `rel_w[:, :, :, None, None, :]`, which lines the key index of every term up with kw and a query index with
    kd / kh. The released weights were trained with that, so the bias for query (qd, qh, qw) and key (kd, kh, kw) is

        a[kw] + b[kd, kw] + c[kh, kw],
        a = q(qd, qh, qw) . Rd[qd, kw],  b = q(qd, qh, kd) . Rh[qh, kw],  c = q(qd, qh, kh) . Rw[kh, kw]

    where q(qd, qh, x) for x beyond the grid is the query of a padding token (= the q bias). Still a sum of terms
    over key coordinates, so the mass of the padded keys factorises per kw.

    q: [B, heads, L, hd] (unscaled, as medim uses it), q_bias [heads, hd], grid G (L = G^3), window 0 (global) or
    K >= G. Returns bias [B, heads, L, L] between real tokens and, when G < K, pad_log_mass [B, heads, L] =
    log(sum over padded key positions of exp(bias)); else None.
    """
    B, heads, L, hd = q.shape
    G = grid
    K = window or G
    q_grid = q.reshape(B, heads, G, G, G, hd)
    # q(qd, qh, x) for x in [0, K): real queries, then padding tokens (zeros after norm1, so q = q bias)
    q_ext = torch.cat([q_grid, q_bias.reshape(1, heads, 1, 1, 1, hd).expand(B, -1, G, G, K - G, -1)], dim=4)
    Rd = get_rel_pos(K, K, rel_pos_d)[:G]  # [G real qd, K kw, hd]
    Rh = get_rel_pos(K, K, rel_pos_h)[:G]  # [G real qh, K kw, hd]
    Rw = get_rel_pos(K, K, rel_pos_w)  # [K x, K kw, hd]
    a = torch.einsum("bndhwc,dkc->bndhwk", q_grid, Rd)  # [B, n, qd, qh, qw, kw]
    b = torch.einsum("bndhxc,hkc->bndhxk", q_ext, Rh)  # [B, n, qd, qh, kd, kw]
    c = torch.einsum("bndhxc,xkc->bndhxk", q_ext, Rw)  # [B, n, qd, qh, kh, kw]

    bias = (a[..., :, None, None, :G] + b[..., None, :G, None, :G] + c[..., None, None, :G, :G]).reshape(B, heads, L, L)
    if K == G:
        return bias, None

    # log of sum over (kd, kh) of exp(b[kd, kw] + c[kh, kw]) restricted to padded keys, per kw:
    # kw padded: every (kd, kh); kw real: {kd padded} + {kd real, kh padded} (disjoint, positive terms)
    b_all, b_lo, b_hi = b.logsumexp(4), b[..., :G, :].logsumexp(4), b[..., G:, :].logsumexp(4)
    c_all, c_hi = c.logsumexp(4), c[..., G:, :].logsumexp(4)
    kw_padded = torch.arange(K, device=q.device) >= G
    pad_kd_kh = torch.where(kw_padded, b_all + c_all, torch.logaddexp(b_hi + c_all, b_lo + c_hi))  # [B, n, qd, qh, kw]
    pad_log_mass = (a + pad_kd_kh[:, :, :, :, None, :]).logsumexp(-1)  # [B, n, qd, qh, qw]
    return bias, pad_log_mass.reshape(B, heads, L)
