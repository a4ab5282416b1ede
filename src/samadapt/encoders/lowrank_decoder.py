"""The SAM 2 mask decoder for many single-point prompts without per-prompt copies of the image tokens.

In the official `TwoWayTransformer` every prompt carries its own copy of the 64x64 image tokens ("keys"), and
most of the decoder's time is spent projecting and normalising those copies. But a prompt changes its keys only
through the image-to-token attention, whose output is

    out[n] = sum_{h,t} P[n, (h, t)] * (v[h, t] @ W_out[h]) + b_out

with P the attention probabilities [N, heads x tokens] and W_out[h] a block of the shared output projection;
and through LayerNorms, which rescale each key row and add shared vectors. So the keys of a prompt are exactly a
short sum of terms, each a per-row scale [N] times one of

- `_Shared`: a matrix [N, D] that every prompt shares (the image tokens, the positional encoding, their
  projections), computed once per image;
- `_Thin`:   P [N, R] @ (coef [R, d] @ basis [d, D]) per head, with a per-prompt P and coef but a *shared* basis;
- `_Vec`:    one row vector repeated over the pixels (biases, LayerNorm weights and mean corrections).

A linear map of such a sum is the same sum with mapped bases (shared work only); attention scores against the
tokens, attention-weighted sums over the pixels and the LayerNorm statistics (row sums and sums of squares,
through pairwise inner products of the terms) all reduce to products of the thin P with small matrices plus
shared products. `ThinDecoder` follows the official module graph step by step on this representation; the keys
are only materialised (`_Lin.materialize`) for the prompts whose masks are needed.

The official modules' weights are used directly (`q_proj`, `k_proj`, `v_proj`, `out_proj`, the LayerNorms,
MLPs and heads), so any SAM 2 / 2.1 checkpoint works unchanged. The results equal the official decoder's up to
float rounding (tests: predicted IoU and keys against `MaskDecoder.predict_masks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Memo:
    """Shared products of one image, keyed by the identity of their inputs (kept alive here, so ids stay unique
    for the memo's life)."""

    def __init__(self) -> None:
        self._store: dict[tuple, tuple[tuple, Tensor]] = {}

    def get(self, name: str, *inputs: Any, compute: Callable[..., Any]) -> Any:
        """`compute(*inputs)`, once per distinct inputs."""
        key = (name, *map(id, inputs))
        hit = self._store.get(key)
        if hit is None:
            hit = (inputs, compute(*inputs))
            self._store[key] = hit
        return hit[1]


@dataclass(frozen=True)
class _Shared:
    m: Tensor  # [N, D]


@dataclass
class _Thin:
    pt: Tensor  # P transposed [B, R, N], R = heads x tokens: rows of N, so products and sums over R run along N
    coef: Tensor  # [B, H, T, d]
    basis: Tensor  # [H, d, D], shared
    _z: Tensor | None = field(default=None, repr=False)

    def z(self) -> Tensor:
        """Per-prompt rows [B, R, D]."""
        if self._z is None:
            b, h, t, _ = self.coef.shape
            self._z = torch.einsum("bhtd,hde->bhte", self.coef, self.basis).reshape(b, h * t, -1)
        return self._z

    def select(self, take: Callable[[Tensor], Tensor]) -> _Thin:
        return _Thin(take(self.pt), take(self.coef), self.basis, None if self._z is None else take(self._z))


@dataclass(frozen=True)
class _Vec:
    v: Tensor  # [D] shared or [B, D] per prompt


_Basis = _Shared | _Thin | _Vec
_Term = tuple[Tensor | None, _Basis]  # (row scale [B, N] or None, basis)


def _rows(x: Tensor) -> Tensor:
    """A per-row quantity ([N] shared, [B, N] or [B, N, 1] per prompt, [B] or [] constant over the rows) as
    something that broadcasts against [B, N]; a 1-D [N] input must be marked by the caller (see `_sum`)."""
    if x.dim() == 3:
        return x[..., 0]
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x


class _Lin:
    """Keys (or a projection of them) of B prompts as a sum of scaled terms (see the module docstring)."""

    def __init__(
        self, terms: list[_Term], *, memo: _Memo, batch: int, n: int, factors: Tensor | None = None
    ) -> None:
        shared_vecs = [b.v for s, b in terms if s is None and isinstance(b, _Vec)]
        terms = [(s, b) for s, b in terms if not (s is None and isinstance(b, _Vec))]
        if shared_vecs:  # one constant row for all the unscaled vectors
            terms.append((None, _Vec(torch.stack(torch.broadcast_tensors(*shared_vecs)).sum(0))))
        unscaled = [b.m for s, b in terms if s is None and isinstance(b, _Shared)]
        if len(unscaled) > 1:  # and one shared matrix for all the unscaled ones
            terms = [(s, b) for s, b in terms if not (s is None and isinstance(b, _Shared))]
            merged = memo.get("sum", *unscaled, compute=lambda *ms: torch.stack(ms).sum(0))
            terms.insert(0, (None, _Shared(merged)))
        self.terms, self.memo, self.batch, self.n = terms, memo, batch, n
        self._factors = factors

    def _new(self, terms: list[_Term]) -> _Lin:
        return _Lin(terms, memo=self.memo, batch=self.batch, n=self.n)

    def is_shared(self) -> bool:
        """Whether every prompt has the same rows (only unscaled shared matrices and vectors)."""
        return all(s is None and not isinstance(b, _Thin) and not (isinstance(b, _Vec) and b.v.dim() == 2)
                   for s, b in self.terms)  # fmt: skip

    def plus(self, terms: list[_Term]) -> _Lin:
        return self._new(self.terms + terms)

    def select(self, idx: Tensor) -> _Lin:
        """The prompts `idx` (views when they are a run of consecutive prompts, with the computed row factors: a
        chunk of the upscaling then copies nothing)."""
        n = len(idx)
        if n and bool((idx == torch.arange(n, device=idx.device) + idx[0]).all()):
            start = int(idx[0])
            if n == self.batch:
                return self  # every prompt
            take: Callable[[Tensor], Tensor] = lambda x: x[start : start + n]  # noqa: E731
        else:
            take = lambda x: x[idx]  # noqa: E731
        terms: list[_Term] = []
        for scale, basis in self.terms:
            if isinstance(basis, _Thin):
                basis = basis.select(take)
            elif isinstance(basis, _Vec) and basis.v.dim() == 2:
                basis = _Vec(take(basis.v))
            terms.append((None if scale is None else take(scale), basis))
        factors = None if self._factors is None else take(self._factors)
        return _Lin(terms, memo=self.memo, batch=n, n=self.n, factors=factors)

    # -- linear maps --------------------------------------------------------------------------------------------

    def project(self, linear: nn.Linear, pe: Tensor | None = None) -> _Lin:
        """`linear(X + pe)` (or `linear(X)`) in the same representation."""
        w, memo = linear.weight, self.memo
        self._left()  # before mapping: every projection of these keys then shares the one row-factor matrix
        terms: list[_Term] = []
        for scale, basis in self.terms:
            if isinstance(basis, _Shared):
                basis = _Shared(memo.get("proj", basis.m, w, compute=lambda m, w: m @ w.T))
            elif isinstance(basis, _Thin):
                basis = _Thin(
                    basis.pt, basis.coef, memo.get("proj", basis.basis, w, compute=lambda b, w: b @ w.T)
                )
            else:
                basis = _Vec(basis.v @ w.T)
            terms.append((scale, basis))
        if pe is None:
            terms.append((None, _Vec(linear.bias)))
        else:
            terms.append(
                (
                    None,
                    _Shared(memo.get("pe", pe, linear, compute=lambda pe, lin: pe @ lin.weight.T + lin.bias)),
                )
            )
        # same row terms in the same order, so the same row factors
        return _Lin(terms, memo=memo, batch=self.batch, n=self.n, factors=self._factors)

    def layer_norm(self, norm: nn.LayerNorm) -> _Lin:
        """`norm(X)` over the last axis."""
        total, square = self._row_sums()
        width = norm.weight.shape[0]
        mean = total / width
        inv = torch.rsqrt((square / width - mean.square()).clamp_min(0.0) + norm.eps)  # [B, N]
        g, memo = norm.weight, self.memo
        terms: list[_Term] = []
        for scale, basis in self.terms:
            if isinstance(basis, _Shared):
                basis = _Shared(memo.get("scale", basis.m, g, compute=torch.mul))
            elif isinstance(basis, _Thin):
                basis = _Thin(basis.pt, basis.coef, memo.get("scale", basis.basis, g, compute=torch.mul))
            else:
                basis = _Vec(basis.v * g)
            terms.append((inv if scale is None else inv * scale, basis))
        terms += [(-inv * mean, _Vec(g)), (None, _Vec(norm.bias))]
        return self._new(terms)

    # -- reductions ---------------------------------------------------------------------------------------------

    # Thin terms and scaled vector terms share one "row factor" matrix per keys state, kept transposed ([B, K, N]:
    # the scaled P blocks, then the scales of the vectors, each a run of N): a projection only maps their column
    # factors, so one batched matrix product per attention covers all of them. Everything per pixel is laid out
    # with the pixels last ([B, H, T, N] scores, [B, R, N] P): the CPU then works along runs of 4096 instead of
    # rows of a few tokens (cats, scales, softmax and the per-head products all several times faster).

    def _row_terms(self) -> list[_Term]:
        return [
            (s, b) for s, b in self.terms if isinstance(b, _Thin) or (isinstance(b, _Vec) and s is not None)
        ]

    def _left(self) -> Tensor | None:
        """Row factors, transposed [B, K, N]."""
        if self._factors is None:
            rows = []
            for scale, basis in self._row_terms():
                if isinstance(basis, _Thin):
                    rows.append(basis.pt if scale is None else basis.pt * scale[:, None, :])
                else:
                    rows.append(scale[:, None, :])
            self._factors = torch.cat(rows, dim=1) if rows else None
        return self._factors

    def _right(self) -> Tensor:
        """Column factors [B, K, D] matching `_left`."""
        rows = []
        for _, basis in self._row_terms():
            if isinstance(basis, _Thin):
                rows.append(basis.z())
            else:
                rows.append(basis.v.reshape(-1, 1, basis.v.shape[-1]).expand(self.batch, 1, -1))
        return torch.cat(rows, dim=1)

    def _shared_terms(self) -> list[_Term]:
        return [(s, b) for s, b in self.terms if isinstance(b, _Shared)]

    def _constant(self) -> Tensor | None:
        vecs = [b.v for s, b in self.terms if s is None and isinstance(b, _Vec)]
        return vecs[0] if vecs else None

    def _heads_t(self, m: Tensor, h: int) -> Tensor:
        """A shared [N, (H, d)] matrix as [H, d, N], once per image."""
        return self.memo.get(
            "heads_t", m, compute=lambda m: m.view(self.n, h, -1).permute(1, 2, 0).contiguous()
        )

    def scores(self, q: Tensor) -> Tensor:
        """sum_d X[b, n, (h, d)] q[b, h, t, d] -> [B, H, T, N] for per-prompt vectors q [B, H, T, d]."""
        b, h, t, d = q.shape
        out = None
        left = self._left()
        if left is not None:
            rq = torch.einsum("bkhd,bhtd->bhtk", self._right().view(b, -1, h, d), q).reshape(b, h * t, -1)
            out = (rq @ left).view(b, h, t, self.n)
        qh = q.transpose(0, 1).reshape(h, b * t, d)  # [H, B*T, d]
        for scale, basis in self._shared_terms():
            # per head [B*T, d] @ [d, N]; read back as [B, H, T, N] through a view whose rows are runs of N
            x = torch.bmm(qh, self._heads_t(basis.m, h)).view(h, b, t, self.n).transpose(0, 1)
            if out is None:
                out = x * scale[:, None, None, :] if scale is not None else x.contiguous()
            elif scale is None:
                out = out.add_(x)
            else:
                out = out.addcmul_(x, scale[:, None, None, :])
        const = self._constant()
        if const is not None:
            out = out.add_((const.reshape(*const.shape[:-1], h, 1, d) * q).sum(-1)[..., None])
        return out

    def weighted(self, pr: Tensor) -> Tensor:
        """sum_n pr[b, h, t, n] X[b, n, (h, d)] -> [B, H, T, d] for attention weights pr [B, H, T, N] whose sum
        over n is 1."""
        b, h, t, n = pr.shape
        out = None
        left = self._left()
        rows = pr.reshape(b, h * t, n)
        if left is not None:
            g = (rows @ left.transpose(1, 2)).view(b, h, t, -1)  # [B, H, T, K]
            right = self._right()
            out = torch.einsum("bhtk,bkhd->bhtd", g, right.view(b, right.shape[1], h, -1))
        for scale, basis in self._shared_terms():
            w = pr if scale is None else pr * scale[:, None, None, :]
            # per head [B*T, N] @ [N, d] (the heads' columns of the shared matrix, once per image)
            heads = self.memo.get(
                "heads", basis.m, compute=lambda m: m.view(n, h, -1).transpose(0, 1).contiguous()
            )
            o = torch.bmm(w.transpose(0, 1).reshape(h, b * t, n), heads).view(h, b, t, -1).transpose(0, 1)
            out = o if out is None else out + o
        const = self._constant()
        if const is not None:
            v = const.reshape(*const.shape[:-1], h, 1, -1)  # [H, 1, d] or [B, H, 1, d]
            out = out + v
        return out

    def _row_sums(self) -> tuple[Tensor, Tensor]:
        """Row sums and row sums of squares [B, N], from pairwise inner products of the terms. Every product with
        a thin term's P (its Gram blocks with the later thin terms, its rows against all vector terms, its row
        sums) is one matrix product: a few products with narrow sides are several times slower on the CPU than
        one wide one."""
        shape = (self.batch, self.n)
        terms = self.terms
        vecs = [(s, b) for s, b in terms if isinstance(b, _Vec)]
        thins = [i for i, (_, b) in enumerate(terms) if isinstance(b, _Thin)]
        total = torch.zeros(shape, dtype=_dtype(terms), device=_device(terms))
        square = torch.zeros_like(total)
        if vecs:
            stacked = torch.stack([b.v.expand(self.batch, -1) for _, b in vecs], dim=1)  # [B, J, D]
            scales = torch.stack(
                [total.new_ones(shape) if s is None else s.expand(shape) for s, _ in vecs], 1
            )
        for i in thins:
            si, bi = terms[i]
            later = [j for j in thins if j >= i]
            zt = bi.z().transpose(1, 2)  # [B, D, Ri]
            blocks = [terms[j][1].z() @ zt for j in later]  # Gram blocks [B, Rj, Ri]
            if vecs:
                blocks.append(stacked @ zt)
            blocks.append(zt.sum(1, keepdim=True))
            out = torch.cat(blocks, dim=1) @ bi.pt  # [B, sum Rj (+ J) + 1, N]
            x = out[:, -1]  # row sums of the thin term
            total += x if si is None else x * si
            at, sq = 0, torch.zeros_like(total)
            for j in later:
                sj, bj = terms[j]
                width = bj.pt.shape[1]
                x = (out[:, at : at + width] * bj.pt).sum(1)
                x = x if sj is None else x * sj
                sq += x if j == i else 2.0 * x
                at += width
            if vecs:
                sq += 2.0 * (out[:, at : at + len(vecs)] * scales).sum(1)
            square += sq if si is None else sq * si
        for i, (si, bi) in enumerate(terms):
            if isinstance(bi, _Thin):
                continue
            x = _rows(self._sum(bi))
            total += x if si is None else x * si
            if isinstance(bi, _Shared) and vecs:  # against all vector terms of all prompts in one product
                x = (bi.m @ stacked.reshape(-1, stacked.shape[2]).T).view(self.n, self.batch, len(vecs))
                x = 2.0 * (x.permute(1, 2, 0) * scales).sum(1)
                square += x if si is None else x * si
            for j, (sj, bj) in enumerate(terms):
                if j < i and not isinstance(bj, _Thin) or isinstance(bj, _Thin) and isinstance(bi, _Vec):
                    continue  # the other order, or above
                if (
                    isinstance(bi, _Shared)
                    and isinstance(bj, _Vec)
                    or isinstance(bi, _Vec)
                    and isinstance(bj, _Shared)
                ):
                    continue  # above
                x = _rows(self._inner(bi, bj))
                if si is not None:
                    x = x * si
                if sj is not None:
                    x = x * sj
                square += x if i == j else 2.0 * x
        return total, square

    def _sum(self, basis: _Basis) -> Tensor:
        if isinstance(basis, _Shared):
            return self.memo.get("sum", basis.m, compute=lambda m: m.sum(1)[None])  # [1, N]
        return basis.v.sum(-1).reshape(-1, 1)  # [1 or B, 1]

    def _inner(self, a: _Basis, b: _Basis) -> Tensor:
        """Row-wise inner products of two terms' rows, shaped to broadcast against [B, N] (see `_rows`)."""
        order = {_Shared: 0, _Thin: 1, _Vec: 2}
        if order[type(a)] > order[type(b)]:
            a, b = b, a
        memo = self.memo
        if isinstance(a, _Shared) and isinstance(b, _Shared):
            return memo.get("inner", a.m, b.m, compute=lambda x, y: (x * y).sum(1)[None])
        if isinstance(a, _Shared) and isinstance(b, _Thin):
            batch, hh, t, d = b.coef.shape
            # the shared rows through each head's basis, [H, d, N], once per image
            sbt = memo.get(
                "sb", a.m, b.basis,
                compute=lambda m, bb: (bb.reshape(hh * d, -1) @ m.T).view(hh, d, -1).contiguous(),
            )  # fmt: skip
            c = torch.bmm(b.coef.transpose(0, 1).reshape(hh, batch * t, d), sbt).view(hh, batch, t, -1)
            # the product in P's layout, then a sum over its rows (a sum over outer axes of c's layout is slow)
            return (b.pt.view(batch, hh, t, -1) * c.transpose(0, 1)).view(b.pt.shape).sum(1)
        if isinstance(a, _Shared):  # and a _Vec (per chunk: not memoised)
            return (a.m @ b.v.T).T if b.v.dim() == 2 else (a.m @ b.v)[None]
        if isinstance(a, _Thin):
            raise AssertionError(
                "products of thin terms with thin or vector terms are batched in `_row_sums`"
            )
        return (a.v * b.v).sum(-1).reshape(-1, 1)

    def shared_matrix(self) -> Tensor:
        """The one [N, D] matrix of keys that every prompt shares (`is_shared`), not a copy per prompt (the constant
        row is merged per chunk: not memoised, it is a fresh tensor each time)."""
        terms = self._shared_terms()
        assert self.is_shared() and len(terms) <= 1, "only for keys every prompt shares"
        const = self._constant()
        if not terms:
            return const.expand(self.n, -1)
        m = terms[0][1].m
        return m if const is None else m + const

    def materialize(
        self,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        product_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The keys themselves [B, N, D], or their image `X @ weight.T + bias` [B, N, D'] under an affine map,
        computed on the factors (cheaper than materialising the keys first when D' >= D); `bias` is [D'] or
        per pixel [N, D']. `product_dtype` (bf16): the per-prompt factors' product in that dtype, added to the
        fp32 shared part (the shared image tokens keep full precision; only the prompt's update is rounded)."""
        memo = self.memo
        const = self._constant()
        if const is not None and weight is not None:
            const = const @ weight.T
        if const is not None and const.dim() == 2:  # per prompt [B, D']: a row for all of its pixels
            const = const[:, None, :]
        # the constant rows and the shared terms first, in one pass that creates the output; the factors' product
        # then accumulates into it in place (each separate pass over [B, N, D'] costs as much as a third of it)
        add = bias if const is None else const if bias is None else bias + const
        out = None
        for scale, basis in self._shared_terms():
            m = (
                basis.m
                if weight is None
                else memo.get("dense", basis.m, weight, compute=lambda m, w: m @ w.T)
            )
            if out is None:
                if scale is None:
                    out = m[None].expand(self.batch, -1, -1) if add is None else m + add
                else:
                    out = m * scale[..., None] if add is None else torch.addcmul(add, m, scale[..., None])
                out, add = out.expand(self.batch, -1, -1).contiguous(), None
            elif scale is None:
                out = out.add_(m)
            else:
                out = out.addcmul_(m[None], scale[..., None])
        left = self._left()
        if left is None:  # the keys always hold a shared term or a row term
            return out
        right = self._right() if weight is None else self._right() @ weight.T
        if out is None:  # no shared term: the constants, or zeros, then the factors' product
            out = right.new_zeros(self.batch, self.n, right.shape[-1])
            if add is not None:
                out = out.add_(add)
        if product_dtype is not None:
            return out.add_(torch.bmm(left.transpose(1, 2).to(product_dtype), right.to(product_dtype)))
        if torch.is_autocast_enabled(out.device.type):  # the product comes in the autocast dtype
            return torch.bmm(left.transpose(1, 2), right).add_(out)
        return out.baddbmm_(left.transpose(1, 2), right)


def _tensor(basis: _Basis) -> Tensor:
    return basis.m if isinstance(basis, _Shared) else basis.pt if isinstance(basis, _Thin) else basis.v


def _dtype(terms: list[_Term]) -> torch.dtype:
    return _tensor(terms[0][1]).dtype


def _device(terms: list[_Term]) -> torch.device:
    return _tensor(terms[0][1]).device


def _softmax_tokens_(scores: Tensor) -> Tensor:
    """`torch.softmax(scores, dim=2)` for [B, H, T, N] scores, in place: element-wise passes over runs of N (torch's
    kernel over a short softmax axis runs one short row at a time, several times slower on the 2-core CPUs)."""
    scores = scores.sub_(scores.amax(dim=2, keepdim=True)).exp_()
    return scores.div_(scores.sum(dim=2, keepdim=True))


def _token_to_image(attn: nn.Module, queries: Tensor, keys: _Lin, pe: Tensor) -> Tensor:
    """`attn(q=queries, k=keys + pe, v=keys)` for queries [B, T, C]: the tokens attend to the image."""
    b, t, _ = queries.shape
    h = attn.num_heads
    q = attn.q_proj(queries)
    q = q.view(b, t, h, -1).transpose(1, 2)  # [B, H, T, d]
    k, v = keys.project(attn.k_proj, pe), keys.project(attn.v_proj)
    if k.is_shared() and v.is_shared():  # the first layer: keys and values are the same for every prompt
        k_shared, v_shared = (x.shared_matrix().view(keys.n, h, -1).transpose(0, 1) for x in (k, v))
        # softmax is per query: all prompts' tokens as the queries of one batch against the one set of keys
        qs = q.transpose(0, 1).reshape(1, h, b * t, -1)
        out = F.scaled_dot_product_attention(qs, k_shared[None], v_shared[None])
        out = out.view(h, b, t, -1).transpose(0, 1)
    else:
        scores = k.scores(q / math.sqrt(q.shape[-1]))  # [B, H, T, N]
        out = v.weighted(torch.softmax(scores, dim=-1))  # [B, H, T, d]
    return attn.out_proj(out.transpose(1, 2).reshape(b, t, -1))


def _image_to_token(attn: nn.Module, queries: Tensor, query_pe: Tensor, keys: _Lin, pe: Tensor) -> _Lin:
    """keys + attn(q=keys + pe, k=queries + query_pe, v=queries), in the thin representation."""
    b, t, _ = queries.shape
    h = attn.num_heads
    k = attn.k_proj(queries + query_pe).view(b, t, h, -1).transpose(1, 2)  # [B, H, T, d]
    v = attn.v_proj(queries).view(b, t, h, -1).transpose(1, 2)
    scores = keys.project(attn.q_proj, pe).scores(k / math.sqrt(k.shape[-1]))  # [B, H, T, N]
    pt = _softmax_tokens_(scores).view(b, h * t, keys.n)  # over the tokens of each head
    w_out = attn.out_proj.weight
    basis = keys.memo.get("out", w_out, compute=lambda w: w.T.reshape(h, -1, w.shape[0]))
    return keys.plus([(None, _Thin(pt, v, basis)), (None, _Vec(attn.out_proj.bias))])


class ThinDecoder:
    """The official `MaskDecoder`'s transformer and IoU head for batches of prompts on one image whose dense
    prompt embedding is the same for all (no mask input)."""

    def __init__(self, decoder: nn.Module, *, image_embed: Tensor, dense: Tensor, image_pe: Tensor) -> None:
        self.decoder = decoder
        self.keys0 = (image_embed[0] + dense[0]).flatten(1).T.contiguous()  # [N, C]
        self.pe = image_pe[0].flatten(1).T.contiguous()
        self.memo = _Memo()

    def __call__(self, tokens: Tensor) -> ThinState:
        """Both two-way layers for prompts `tokens` [B, T, C] (the output tokens then the sparse prompt
        embeddings); `iou` and `outputs` finish the final attention."""
        transformer = self.decoder.transformer
        keys = _Lin(
            [(None, _Shared(self.keys0))], memo=self.memo, batch=tokens.shape[0], n=self.keys0.shape[0]
        )
        pe, queries, query_pe = self.pe, tokens, tokens
        for layer in transformer.layers:
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(q=queries, k=queries, v=queries)
            else:
                q = queries + query_pe
                queries = queries + layer.self_attn(q=q, k=q, v=queries)
            queries = layer.norm1(queries)
            out = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys, pe)
            queries = layer.norm2(queries + out)
            queries = layer.norm3(queries + layer.mlp(queries))
            keys = _image_to_token(layer.cross_attn_image_to_token, queries, query_pe, keys, pe)
            keys = keys.layer_norm(layer.norm4)
        return ThinState(queries=queries, query_pe=query_pe, keys=keys)

    def _final(self, queries: Tensor, query_pe: Tensor, keys: _Lin) -> Tensor:
        attn = self.decoder.transformer.final_attn_token_to_image
        out = _token_to_image(attn, queries + query_pe, keys, self.pe)
        return self.decoder.transformer.norm_final_attn(queries + out)

    def iou(self, state: ThinState) -> Tensor:
        """Predicted IoU [B, mask tokens]. The final attention is per token, so only the IoU token's runs."""
        s = 1 if self.decoder.pred_obj_scores else 0
        token = slice(s, s + 1)
        out = self._final(state.queries[:, token], state.query_pe[:, token], state.keys)
        return self.decoder.iou_prediction_head(out[:, 0, :])

    def final(self, state: ThinState, tokens: Tensor) -> Tensor:
        """The final attention's output [B, len(tokens), C] for the output tokens `tokens` (indices) of every
        prompt (the attention is per token, so the others need not run)."""
        return self._final(state.queries[:, tokens], state.query_pe[:, tokens], state.keys)

    def image_tokens(
        self,
        state: ThinState,
        idx: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        *,
        product_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """The image tokens [b, N, C] of the prompts `idx` (or `tokens @ weight.T + bias`, see `outputs`;
        `product_dtype`: see `_Lin.materialize`)."""
        return state.keys.select(idx).materialize(weight, bias, product_dtype=product_dtype)

    def outputs(
        self,
        state: ThinState,
        idx: Tensor,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        tokens: slice = slice(None),
    ) -> tuple[Tensor, Tensor]:
        """(output tokens [b, T, C], image tokens [b, N, C]) of the prompts `idx`, as the official
        `TwoWayTransformer` returns them; with `weight` [D, C] (and `bias`), the image tokens come as
        `tokens @ weight.T + bias`; `tokens` picks the output tokens to compute (the final attention is per
        token)."""
        keys = state.keys.select(idx)
        queries, query_pe = state.queries[idx][:, tokens], state.query_pe[idx][:, tokens]
        return self._final(queries, query_pe, keys), keys.materialize(weight, bias)


@dataclass
class ThinState:
    """The decoder state after the two-way layers: per-prompt tokens and their thin keys."""

    queries: Tensor
    query_pe: Tensor
    keys: _Lin
