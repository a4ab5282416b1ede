"""The SAM 2 mask decoder's IoU predictions for many single-point prompts without per-prompt image tokens.

In the official `TwoWayTransformer` every prompt carries its own copy of the 64x64 image tokens ("keys"), and
most of the decoder's time is spent projecting and normalising those copies. But a prompt changes its keys only
through the image-to-token attention, whose output is `softmax(...) @ (v W_out)`: a matrix of rank at most
heads x tokens (64) plus the bias, and a LayerNorm, which rescales each key row. So the keys of prompt b are

    X_b = diag(a_b) K + U_b V_b        (K: [N, C] shared by all prompts; a_b: [N]; U_b: [N, r]; V_b: [r, C])

exactly, and every quantity the queries need (projections of X_b + pe, row means and variances for the
LayerNorms) is a product with the shared K, precomputed once, plus products with the thin U_b, V_b.
`point_iou` follows the official module graph step by step on that representation and returns the predicted IoU
of every mask token. The result equals the official decoder's up to float rounding; `FastMaskGenerator` uses it
only to decide which points can have a candidate above `pred_iou_thresh` (with a margin) and reruns the official
decoder on those, so the returned masks and scores are the official arithmetic.

The official modules' weights are used directly (`q_proj`, `k_proj`, `v_proj`, `out_proj`, the LayerNorms,
MLPs and heads), so any SAM 2 / 2.1 checkpoint works unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class _Keys:
    """Keys of B prompts as diag(a) K + U V (see the module docstring)."""

    def __init__(self, k: Tensor, batch: int, memo: dict[tuple[int, bool], tuple[Tensor, Tensor]]) -> None:
        n, c = k.shape
        self.memo = memo  # shared projections per Linear: each projects the keys at one point of the graph
        self.k = k  # [N, C], shared
        self.a = k.new_ones(batch, n)  # [B, N]
        self.u = k.new_zeros(batch, n, 0)  # [B, N, r]
        self.v = k.new_zeros(batch, 0, c)  # [B, r, C]

    def projection(self, linear: nn.Linear, pe: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """`linear(X + pe)` as (shared [N, Ci], thin [B, r, Ci], constant [N, Ci]): a*shared + U thin + const."""
        key = (id(linear), pe is None)
        if key not in self.memo:
            shared = self.k @ linear.weight.T
            const = linear.bias.expand_as(shared) if pe is None else pe @ linear.weight.T + linear.bias
            self.memo[key] = (shared, const)
        shared, const = self.memo[key]
        return shared, self.v @ linear.weight.T, const

    def add(self, u: Tensor, v: Tensor) -> None:
        self.u = torch.cat([self.u, u], dim=2)
        self.v = torch.cat([self.v, v], dim=1)

    def layer_norm(self, norm: nn.LayerNorm) -> None:
        c = self.k.shape[1]
        v_sum = self.v.sum(dim=2)  # [B, r]
        mean = (self.a * self.k.sum(dim=1) + torch.einsum("bnr,br->bn", self.u, v_sum)) / c
        kv = torch.einsum("nc,brc->bnr", self.k, self.v)  # [B, N, r]
        gram = self.v @ self.v.transpose(1, 2)  # [B, r, r]
        square = (
            self.a.square() * self.k.square().sum(dim=1)
            + 2.0 * self.a * (self.u * kv).sum(dim=2)
            + (self.u * (self.u @ gram)).sum(dim=2)
        ) / c
        inv = torch.rsqrt((square - mean.square()).clamp_min(0.0) + norm.eps)  # [B, N]
        g, beta = norm.weight, norm.bias
        batch, n = self.a.shape
        ones = self.a.new_ones(batch, n, 1)
        self.k = self.k * g
        self.a = self.a * inv
        self.u = torch.cat([self.u * inv[..., None], (-mean * inv)[..., None], ones], dim=2)
        self.v = torch.cat(
            [self.v * g, g.expand(batch, 1, c), beta.expand(batch, 1, c)], dim=1
        )  # fmt: skip


def _heads(x: Tensor, heads: int) -> Tensor:
    """[..., L, Ci] -> [..., H, L, d] for a batched tensor; [L, Ci] -> [L, H, d] for a shared one."""
    *lead, length, ci = x.shape
    x = x.reshape(*lead, length, heads, ci // heads)
    return x if not lead else x.transpose(-3, -2)


def _split(thin: Tensor, heads: int) -> Tensor:
    """[B, r, Ci] -> [B, r, H, d] (r may be 0)."""
    b, r, ci = thin.shape
    return thin.reshape(b, r, heads, ci // heads)


def _token_to_image(attn: nn.Module, queries: Tensor, keys: _Keys, pe: Tensor) -> Tensor:
    """`attn(q=queries, k=keys + pe, v=keys)` for queries [B, T, C]: the tokens attend to the image."""
    h = attn.num_heads
    q = _heads(attn.q_proj(queries), h)  # [B, H, T, d]
    k_shared, k_thin, k_const = keys.projection(attn.k_proj, pe)
    v_shared, v_thin, _ = keys.projection(attn.v_proj, None)
    scores = torch.einsum("bhtd,nhd->bhtn", q, _heads(k_shared, h)) * keys.a[:, None, None, :]
    b, _, t, _ = q.shape
    qk_thin = torch.einsum("bhtd,brhd->bhtr", q, _split(k_thin, h)).reshape(b, h * t, -1)
    scores = scores + (qk_thin @ keys.u.transpose(1, 2)).reshape(b, h, t, -1)
    scores = scores + torch.einsum("bhtd,nhd->bhtn", q, _heads(k_const, h))
    p = torch.softmax(scores / math.sqrt(q.shape[-1]), dim=-1)  # [B, H, T, N]
    out = torch.einsum("bhtn,nhd->bhtd", p * keys.a[:, None, None, :], _heads(v_shared, h))
    pu = (p.reshape(b, h * t, -1) @ keys.u).reshape(b, h, t, -1)  # [B, H, T, r]
    out = out + torch.einsum("bhtr,brhd->bhtd", pu, _split(v_thin, h))
    out = out + attn.v_proj.bias.reshape(1, h, 1, -1)  # softmax rows sum to 1
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, -1))


def _image_to_token(attn: nn.Module, queries: Tensor, query_pe: Tensor, keys: _Keys, pe: Tensor) -> None:
    """keys += attn(q=keys + pe, k=queries + query_pe, v=queries), kept in the thin representation."""
    h = attn.num_heads
    k = _heads(attn.k_proj(queries + query_pe), h)  # [B, H, T, d]
    v = _heads(attn.v_proj(queries), h)  # [B, H, T, d]
    q_shared, q_thin, q_const = keys.projection(attn.q_proj, pe)
    scores = torch.einsum("nhd,bhtd->bhnt", _heads(q_shared, h), k) * keys.a[:, None, :, None]
    b, _, t, _ = k.shape
    n = keys.u.shape[1]
    qk_thin = torch.einsum("brhd,bhtd->brht", _split(q_thin, h), k).reshape(b, -1, h * t)
    scores = scores + (keys.u @ qk_thin).reshape(b, n, h, t).permute(0, 2, 1, 3)
    scores = scores + torch.einsum("nhd,bhtd->bhnt", _heads(q_const, h), k)
    p = torch.softmax(scores / math.sqrt(k.shape[-1]), dim=-1)  # [B, H, N, T]
    c = attn.out_proj.weight.shape[0]
    w_out = attn.out_proj.weight.reshape(c, h, -1)  # [C, H, d]
    m = torch.einsum("bhtd,chd->bhtc", v, w_out)  # [B, H, T, C]
    u = p.permute(0, 2, 1, 3).reshape(b, n, h * t)
    keys.add(
        torch.cat([u, u.new_ones(b, n, 1)], dim=2),
        torch.cat([m.reshape(b, h * t, c), attn.out_proj.bias.expand(b, 1, c)], dim=1),
    )


def point_iou(
    decoder: nn.Module,
    *,
    image_embed: Tensor,
    dense: Tensor,
    image_pe: Tensor,
    tokens: Tensor,
    batch_size: int = 64,
) -> Tensor:
    """Predicted IoU [B, num_mask_tokens] of the official `MaskDecoder` for prompts whose dense embedding is the
    same for all (no mask input): `image_embed` [1, C, h, w], `dense` [1 or B, C, h, w] (only [0] is read),
    `image_pe` [1, C, h, w], `tokens` [B, T, C] (output tokens then the sparse prompt embeddings)."""
    k0 = (image_embed[0] + dense[0]).flatten(1).T  # [N, C]
    pe = image_pe[0].flatten(1).T
    memo: dict[tuple[int, bool], tuple[Tensor, Tensor]] = {}
    parts = [
        _point_iou(decoder, _Keys(k0, len(chunk), memo), pe, chunk) for chunk in tokens.split(batch_size)
    ]
    return torch.cat(parts)


def _point_iou(decoder: nn.Module, keys: _Keys, pe: Tensor, tokens: Tensor) -> Tensor:
    transformer = decoder.transformer
    queries, query_pe = tokens, tokens
    for layer in transformer.layers:
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        queries = layer.norm2(queries + _token_to_image(layer.cross_attn_token_to_image, queries + query_pe,
                                                        keys, pe))  # fmt: skip
        queries = layer.norm3(queries + layer.mlp(queries))
        _image_to_token(layer.cross_attn_image_to_token, queries, query_pe, keys, pe)
        keys.layer_norm(layer.norm4)
    out = _token_to_image(transformer.final_attn_token_to_image, queries + query_pe, keys, pe)
    queries = transformer.norm_final_attn(queries + out)
    s = 1 if decoder.pred_obj_scores else 0
    return decoder.iou_prediction_head(queries[:, s, :])
