"""Multi-head attention with SAM's decomposed relative-position bias, computed without the full bias tensor.

SAM (after ViTDet / MViTv2) adds to every attention logit a term that depends on the query and on the key's row
and column: ``logits[q, (kh, kw)] = scale * q.k + rel_h[q, kh] + rel_w[q, kw]`` with
``rel_h[q, kh] = q . Rh[row(q), kh]`` (unscaled q). The official code builds the whole ``N x N`` bias for every
head (4096 x 4096 x 12 per global block at 1024 input) and adds it to an ``N x N`` logit tensor: that is where
most of its CPU time goes. Here logits are computed in blocks of queries that fit in the L3 cache; each block
is one plain GEMM, two broadcast adds of the small ``rel_h``/``rel_w`` terms in place, a softmax and a GEMM with v.
The arithmetic is the official one, so fp32 matches it to rounding; bf16 runs as plain bf16 GEMMs.

On non-CPU devices the same bias goes to ``F.scaled_dot_product_attention`` as an additive mask, in query blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from samadapt.encoders.export_mode import plain_ops_active

# Bytes of one block of logits (1024 queries x 4096 keys of one head in bf16, 512 in fp32; or ~100 windows of
# 196 x 196). Every op on a block is one OpenMP fork/join; on a machine whose cores other processes also use, each
# join waits for a descheduled thread, so fewer, larger blocks win there, while on an idle machine blocks that stay
# in cache win. Measured on a 2-core AVX-512 machine, one global block (12 heads, 4096 tokens, 2 threads), idle:
# bf16 4/8/16 MiB -> 257/275/335 ms, fp32 -> 562/534/478 ms; under load from other processes, bf16 with 2^19, 2^21,
# 2^23 elements -> 15 s, 3.8 s, 1.2 s. 8 MiB is the compromise.
CPU_BLOCK_BYTES = 8 << 20
# On accelerators the bias block is materialised for SDPA; this bounds its memory (bytes = 2-4 x this).
SDPA_BLOCK_ELEMENTS = 1 << 28


def get_rel_pos(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """Relative-position table [q_size, k_size, C] for query/key positions along one axis (official semantics).

    When ``rel_pos`` does not have ``2 * max(q_size, k_size) - 1`` rows it is linearly interpolated first, exactly
    as ``segment_anything.modeling.image_encoder.get_rel_pos`` does.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(rel_pos.T[None], size=max_rel_dist, mode="linear")[0].T
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def rel_pos_terms(
    q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor, size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """The decomposed bias terms for queries ``q`` [G, h*w, C] on an h x w grid: ``rel_h`` [G, h*w, h] and
    ``rel_w`` [G, h*w, w] (keys on the same grid)."""
    h, w = size
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("ghwc,hkc->ghwk", r_q, get_rel_pos(h, h, rel_pos_h))
    rel_w = torch.einsum("ghwc,wkc->ghwk", r_q, get_rel_pos(w, w, rel_pos_w))
    return rel_h.reshape(q.shape[0], h * w, h), rel_w.reshape(q.shape[0], h * w, w)


def rel_pos_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, *, scale: float, out: Tensor | None = None
) -> Tensor:
    """softmax(scale * q k^T + rel_h[:, :, kh] + rel_w[:, :, kw]) v for G independent (window, head) items.

    q, k, v: [G, N, C] (any strides with unit last stride) with N = kh * kw keys in row-major grid order;
    rel_h [G, N, kh], rel_w [G, N, kw]. Returns [G, N, C] (written into ``out`` when given).
    """
    if plain_ops_active():
        return plain_rel_pos_attention(q, k, v, rel_h, rel_w, scale=scale, out=out)
    if q.device.type != "cpu":
        return sdpa_rel_pos_attention(q, k, v, rel_h, rel_w, scale=scale, out=out)
    if out is None:
        out = q.new_empty(q.shape)
    q = q * scale  # the official code scales q before the product (the bias terms use the unscaled q)
    block = CPU_BLOCK_BYTES // q.element_size()  # logits per block
    if q.shape[1] ** 2 <= block:
        _small_items(q, k, v, rel_h, rel_w, out, block=block)
    elif torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_h, rel_w)):
        _query_blocks_autograd(q, k, v, rel_h, rel_w, out, block=block)
    else:
        _query_blocks(q, k, v, rel_h, rel_w, out, block=block)
    return out


def _query_blocks(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, out: Tensor, *, block: int
) -> None:
    # Global attention: one (image, head) item at a time, in blocks of queries; neither the N x N bias nor the
    # N x N logits of a whole head ever exist. Four ops per block, all writing into reused buffers: the bias
    # rel_h[:, kh] + rel_w[:, kw] by one broadcast add, the logit GEMM accumulated onto it (addmm_, beta=1),
    # the softmax, and the GEMM with v straight into the output rows.
    n, kh, kw = q.shape[1], rel_h.shape[-1], rel_w.shape[-1]
    step = max(16, block // n)
    # k and v are strided views into the qkv output; one small copy makes both GEMMs faster (measured 105 -> 136
    # GFLOP/s for the probability x v product).
    k, v = k.contiguous(), v.contiguous()
    logits = q.new_empty(min(step, n), n)
    for g in range(q.shape[0]):
        k_t, v_g = k[g].T, v[g]
        for s0 in range(0, n, step):
            s1 = min(n, s0 + step)
            chunk = logits[: s1 - s0]
            torch.add(rel_h[g, s0:s1, :, None], rel_w[g, s0:s1, None, :], out=chunk.view(s1 - s0, kh, kw))
            chunk.addmm_(q[g, s0:s1], k_t)
            torch.mm(torch.softmax(chunk, dim=-1), v_g, out=out[g, s0:s1])


def _query_blocks_autograd(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, out: Tensor, *, block: int
) -> None:
    # The same computation without out= ops, so that autograd can differentiate it (fine-tuning through the encoder).
    n, kh, kw = q.shape[1], rel_h.shape[-1], rel_w.shape[-1]
    step = max(16, block // n)
    for g in range(q.shape[0]):
        for s0 in range(0, n, step):
            s1 = min(n, s0 + step)
            logits = torch.mm(q[g, s0:s1], k[g].T).view(s1 - s0, kh, kw)
            logits = (logits + rel_h[g, s0:s1, :, None] + rel_w[g, s0:s1, None, :]).view(s1 - s0, n)
            out[g, s0:s1] = torch.mm(torch.softmax(logits, dim=-1), v[g])


def _small_items(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, out: Tensor, *, block: int
) -> None:
    # Windowed attention: many small items (196 x 196 logits each), batched so one batch of logits stays in cache.
    groups, n = q.shape[:2]
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    step = max(1, block // (n * n))
    # In fp32 the broadcast adds are fastest. In bf16 they hit a slow path for these short rows (14 values), so the
    # bias is built instead by a small GEMM with one-hot key rows/columns ([rel_h, rel_w] @ onehot^T, exact
    # selection) and added inside the logit GEMM (baddbmm), measured about 2x faster.
    via_gemm = q.dtype != torch.float32
    if via_gemm:
        rel = torch.cat([rel_h, rel_w], dim=-1)
        onehot_t = _grid_onehot(kh, kw, dtype=q.dtype, device=q.device).T
    for g0 in range(0, groups, step):
        g1 = min(groups, g0 + step)
        k_t = k[g0:g1].transpose(1, 2)
        if via_gemm:
            bias = torch.matmul(rel[g0:g1], onehot_t)
            logits = torch.baddbmm(bias, q[g0:g1], k_t)
        else:
            logits = torch.bmm(q[g0:g1], k_t)
            grid = logits.view(g1 - g0, n, kh, kw)
            grid.add_(rel_h[g0:g1, :, :, None]).add_(rel_w[g0:g1, :, None, :])
        out[g0:g1] = torch.bmm(torch.softmax(logits, dim=-1), v[g0:g1])


def _grid_onehot(kh: int, kw: int, *, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[kh * kw, kh + kw]: for key (r, c) in row-major order, a one at column r and one at column kh + c."""
    eye_h = torch.eye(kh, dtype=dtype, device=device).repeat_interleave(kw, dim=0)
    eye_w = torch.eye(kw, dtype=dtype, device=device).repeat(kh, 1)
    return torch.cat([eye_h, eye_w], dim=1)


def plain_rel_pos_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, *, scale: float, out: Tensor | None = None
) -> Tensor:
    """Same as ``rel_pos_attention`` in a few batched plain ops (the whole N x N bias at once, as the official
    code builds it): what export mode (``export_mode.plain_torch_ops``) uses, since ONNX has no loops of out= ops."""
    groups, n, _ = q.shape
    kh, kw = rel_h.shape[-1], rel_w.shape[-1]
    logits = torch.matmul(q * scale, k.transpose(-2, -1)).view(groups, n, kh, kw)
    logits = (logits + rel_h[:, :, :, None] + rel_w[:, :, None, :]).view(groups, n, n)
    result = torch.matmul(torch.softmax(logits, dim=-1), v)
    if out is None:
        return result
    out.copy_(result)
    return out


def sdpa_rel_pos_attention(
    q: Tensor, k: Tensor, v: Tensor, rel_h: Tensor, rel_w: Tensor, *, scale: float, out: Tensor | None = None
) -> Tensor:
    """Same as ``rel_pos_attention`` through ``F.scaled_dot_product_attention`` with the bias as an additive mask
    (materialised per block of queries); used on GPUs, where SDPA's fused kernels take the bias."""
    groups, n, _ = q.shape
    if out is None:
        out = q.new_empty(q.shape)
    step_g = max(1, SDPA_BLOCK_ELEMENTS // (n * n))
    step_q = n if step_g > 1 else max(64, SDPA_BLOCK_ELEMENTS // n)
    for g0 in range(0, groups, step_g):
        g1 = min(groups, g0 + step_g)
        for s0 in range(0, n, step_q):
            s1 = min(n, s0 + step_q)
            bias = (rel_h[g0:g1, s0:s1, :, None] + rel_w[g0:g1, s0:s1, None, :]).view(g1 - g0, s1 - s0, n)
            out[g0:g1, s0:s1] = F.scaled_dot_product_attention(
                q[g0:g1, s0:s1], k[g0:g1], v[g0:g1], attn_mask=bias.to(q.dtype), scale=scale
            )
    return out
