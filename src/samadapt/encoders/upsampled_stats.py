"""The stability filter and boxes of bilinearly upsampled mask logits, without upsampling every mask.

The official generator upsamples each candidate's 256 x 256 logits to the full image
(`F.interpolate(..., mode="bilinear", align_corners=False)`) and then counts pixels above `threshold +- offset`
(stability score) and finds the rows / columns above `threshold` (box). For a 1024 image that is a million
values per candidate, written and read three times; with a trained checkpoint about two thousand candidates of a
32 x 32 grid pass the IoU bar, and these passes cost more than the decoder.

Every upsampled pixel is a convex combination of the 2 x 2 low-resolution values around it (a "block"). Where a
block's four values are all above a threshold (or all at or below it) by more than float rounding, so are all of
its pixels, and they are counted by the block's pixel count without being computed. Only the pixels of the blocks
that straddle a threshold (the masks' edges: a few percent of the blocks for confident masks) are computed, with
the weights and the operation order (fused multiply-adds) of torch's CPU bilinear kernel, so that their values
are the ones `F.interpolate` gives (bitwise on the CPUs we test on; otherwise within one float rounding). And
most candidates need not even those: the decided blocks' counts bound the stability score, and the box only
depends on the edge blocks beyond the rows and columns the decided blocks cover.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A convex combination of four float32 values computed with fused multiply-adds lies within a few units of
# float32 rounding (6e-8 relative) of the values' range; 1e-5 relative is far outside that and costs nothing.
ROUNDING_MARGIN = 1e-5
# Below this many output pixels per source pixel, upsampling everything is as cheap as sorting out the blocks.
MIN_UPSAMPLING = 4
# Above this fraction of undecided blocks (logits that hug the threshold everywhere, as an untrained decoder's do)
# computing their pixels costs more than upsampling everything: then the candidate is upsampled.
MAX_UNDECIDED = 0.2


@dataclass(frozen=True)
class _Axis:
    """One axis of torch's bilinear resampling with align_corners=False, input size n to output size N, and its
    output indices in groups: consecutive indices with the same lower source index, at most `span` of them
    (ceil(N / n); the edges, where torch clamps the source index, would otherwise make groups of 6 at 4x)."""

    i0: torch.Tensor  # [N] the lower source index of each output index
    i1: torch.Tensor  # [N] the upper source index (the lower one at the last source index)
    w0: torch.Tensor  # [N] the lower source index's weight
    w1: torch.Tensor  # [N] the upper source index's weight
    start: torch.Tensor  # [G] its first output index
    count: torch.Tensor  # [G] its number of output indices (1..span)
    outputs: torch.Tensor  # [n] the number of output indices of each lower source index
    first_out: torch.Tensor  # [n] the first of them (N where there is none)
    last_out: torch.Tensor  # [n] the last of them (-1 where there is none)
    first_group: torch.Tensor  # [n] the first of the groups of each source index
    groups: torch.Tensor  # [n] their number (0 where no output index has this lower source index)
    span: int
    # per group, for gathers of whole rows: its output indices [G, span] (clamped to N - 1 past its count), which
    # of them are its own [G, span], their weights [G, span] and its upper source index [G]
    group_out: torch.Tensor
    group_ok: torch.Tensor
    group_w0: torch.Tensor
    group_w1: torch.Tensor
    group_i1: torch.Tensor

    @classmethod
    def of(cls, n: int, size: int, device: torch.device) -> _Axis:
        # `area_pixel_compute_scale` / `area_pixel_compute_source_index`: scale * (i + 0.5) - 0.5, which the
        # compiled kernel fuses into one multiply-add (exact in float64, then rounded once to float32)
        scale = torch.tensor(n / size, dtype=torch.float32).double()
        dst = torch.arange(size, dtype=torch.float32).double() + 0.5
        src = (scale * dst - 0.5).float().clamp(min=0.0)
        i0 = src.floor().long().clamp(max=n - 1)
        w1 = (src - i0.float()).clamp(0.0, 1.0)
        i1 = i0 + (i0 < n - 1).long()
        span = -(-size // n)
        # a new group where the source index changes or the current group is full
        first_of_source = torch.ones(size, dtype=torch.bool)
        first_of_source[1:] = i0[1:] != i0[:-1]
        run_start = torch.cummax(torch.where(first_of_source, torch.arange(size), 0), dim=0).values
        new = first_of_source | ((torch.arange(size) - run_start) % span == 0)
        group = torch.cumsum(new.long(), dim=0) - 1
        start = new.nonzero().squeeze(1)
        count = torch.bincount(group)
        groups = torch.bincount(i0[start], minlength=n)
        first_group = torch.cumsum(groups, dim=0) - groups
        outputs = torch.bincount(i0, minlength=n)
        out = torch.arange(size)
        first_out = torch.full((n,), size, dtype=torch.long).scatter_reduce_(0, i0, out, reduce="amin")
        last_out = torch.full((n,), -1, dtype=torch.long).scatter_reduce_(0, i0, out, reduce="amax")
        w0 = 1.0 - w1
        group_out = (start[:, None] + torch.arange(span)).clamp(max=size - 1)
        group_ok = torch.arange(span) < count[:, None]
        tensors = (i0, i1, w0, w1, start, count, outputs, first_out, last_out, first_group, groups)
        per_group = (group_out, group_ok, w0[group_out], w1[group_out], i1[start])
        return cls(*(t.to(device) for t in tensors), span, *(t.to(device) for t in per_group))


def stability_score(logits: torch.Tensor, *, threshold: float, offset: float) -> torch.Tensor:
    """The official stability score (IoU of the masks at threshold +- offset) of [K, H, W] logits."""
    inter = (logits > threshold + offset).flatten(1).sum(1, dtype=torch.int64)
    union = (logits > threshold - offset).flatten(1).sum(1, dtype=torch.int64)
    return inter / union


def boxes_of_logits(logits: torch.Tensor, *, threshold: float) -> torch.Tensor:
    """XYXY boxes of the masks `logits > threshold` ([K, H, W]), [0, 0, 0, 0] for empty ones, as
    `sam2.utils.amg.batched_mask_to_box` gives, from two max-reductions instead of the full boolean masks."""
    return boxes_of_any(logits.amax(dim=2) > threshold, logits.amax(dim=1) > threshold)


def upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[K, h, w] -> [K, H, W] as `SAM2Transforms.postprocess_masks` does."""
    return F.interpolate(logits[:, None].float(), size, mode="bilinear", align_corners=False)[:, 0]


# `stability_status` values
STABLE, UNSTABLE, UNDECIDED = 1, 0, -1


def stable_boxes(
    logits: torch.Tensor,
    size: tuple[int, int],
    *,
    threshold: float,
    offset: float,
    stability_thresh: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep [K] bool, XYXY boxes [K, 4]) of the masks `F.interpolate(logits[:, None], size, mode="bilinear",
    align_corners=False)[:, 0] > threshold`: keep is `calculate_stability_score(upsampled, threshold, offset) >=
    stability_thresh` (all True for stability_thresh <= 0, where the official generator skips the filter), and
    the boxes are `batched_mask_to_box` of the kept masks (zeros for an empty mask; the dropped masks' boxes are
    not exact). `logits` are [K, h, w] in image order: `stability_status`, then `exactly_stable` for the
    candidates it leaves undecided."""
    status, boxes = stability_status(
        logits, size, threshold=threshold, offset=offset, stability_thresh=stability_thresh
    )
    keep = status == STABLE
    pending = (status == UNDECIDED).nonzero().squeeze(1)
    if len(pending):
        keep[pending] = exactly_stable(
            logits[pending], size, threshold=threshold, offset=offset, stability_thresh=stability_thresh
        )
    return keep, boxes


def stability_status(
    logits: torch.Tensor,
    size: tuple[int, int],
    *,
    threshold: float,
    offset: float,
    stability_thresh: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(status [K] int8: `STABLE`, `UNSTABLE` or `UNDECIDED`, XYXY boxes [K, 4], exact wherever the status is not
    `UNSTABLE`) of the upsampled masks (see `stable_boxes`), without computing any pixel for the stability score:
    a candidate's stability is bounded by the pixel counts of the decided blocks (those with all pixels above or
    all at or below the threshold) and of the undecided ones, and is `UNDECIDED` where the bounds straddle
    `stability_thresh` (`exactly_stable` settles it; a caller that only needs some of these, such as NMS, which
    needs the candidates no kept mask suppresses, can leave the others). A box only needs the undecided blocks
    that reach beyond the rows or columns the decided blocks already cover."""
    k, h, w = logits.shape
    x = logits.float()
    if size[0] * size[1] < MIN_UPSAMPLING * h * w:
        keep, boxes = _filter_upsampled(
            x, size, threshold=threshold, offset=offset, stability_thresh=stability_thresh
        )
        return keep.to(torch.int8), boxes
    grid = _BlockGrid(x, size)
    status = torch.full((k,), STABLE, dtype=torch.int8, device=x.device)
    if stability_thresh > 0.0:
        # stability = inter / union, inter = count(> t + offset), union = count(> t - offset)
        (inter_lo, inter_hi), (union_lo, union_hi) = (
            grid.count_bounds(threshold + offset),
            grid.count_bounds(threshold - offset),
        )
        low = inter_lo / union_hi  # nan (0 / 0) for a certainly empty mask, as the official 0 / 0
        high = inter_hi / union_lo
        status[~(low >= stability_thresh)] = UNDECIDED
        status[~(high >= stability_thresh)] = UNSTABLE
    boxes, heavy = _block_boxes(grid, status != UNSTABLE, threshold=threshold)
    if bool(heavy.any()):  # too many undecided pixels to compute: upsampled
        idx = heavy.nonzero().squeeze(1)
        keep, boxes[idx] = _filter_upsampled(
            x[idx], size, threshold=threshold, offset=offset, stability_thresh=stability_thresh
        )
        status[idx] = keep.to(torch.int8)
    return status, boxes


def exactly_stable(
    logits: torch.Tensor,
    size: tuple[int, int],
    *,
    threshold: float,
    offset: float,
    stability_thresh: float,
) -> torch.Tensor:
    """[K] bool: `calculate_stability_score(upsampled, threshold, offset) >= stability_thresh`, from the decided
    blocks' pixel counts and the undecided blocks' pixels (computed with torch's CPU kernel's weights and fused
    multiply-adds); candidates with more than `MAX_UNDECIDED` undecided blocks are upsampled."""
    k, h, w = logits.shape
    x = logits.float()
    if size[0] * size[1] < MIN_UPSAMPLING * h * w:
        return _filter_upsampled(
            x, size, threshold=threshold, offset=offset, stability_thresh=stability_thresh
        )[0]
    grid = _BlockGrid(x, size)
    thresholds = (threshold + offset, threshold - offset)
    undecided = [grid.undecided(t) for t in thresholds]
    heavy = torch.stack([_count(u) for u in undecided]).amax(0) > MAX_UNDECIDED * h * w
    counts = []
    for t, blocks in zip(thresholds, undecided, strict=True):
        px = grid.pixels(blocks & ~heavy[:, None, None])
        exact = ((px.values > t) & px.valid).sum(dim=(1, 2))
        counts.append(grid.certain_count(t).long().index_add(0, px.kk, exact))
    keep = counts[0].to(torch.int32) / counts[1].to(torch.int32) >= stability_thresh
    if bool(heavy.any()):
        idx = heavy.nonzero().squeeze(1)
        keep[idx] = _filter_upsampled(
            x[idx], size, threshold=threshold, offset=offset, stability_thresh=stability_thresh
        )[0]
    return keep


def _block_boxes(
    grid: _BlockGrid, wanted: torch.Tensor, *, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(XYXY boxes [K, 4] of `> threshold`, exact for the `wanted` candidates that are not "heavy" [K] bool: with
    more than `MAX_UNDECIDED` of their blocks to compute): the rows and columns covered by decided blocks, then
    the pixels of the undecided blocks that reach beyond them."""
    k, h, w = grid.x.shape
    heavy = torch.zeros(k, dtype=torch.bool, device=grid.x.device)
    row_any = grid.any_above_along(threshold, dim=2)[:, grid.rows.i0]  # [K, H]
    col_any = grid.any_above_along(threshold, dim=1)[:, grid.cols.i0]  # [K, W]
    idx = wanted.nonzero().squeeze(1)
    if len(idx):
        sub = grid.subset(idx)
        y0, y1 = _edges(row_any[idx])
        x0, x1 = _edges(col_any[idx])
        rows_out = (grid.rows.first_out[None, :] < y0[:, None]) | (grid.rows.last_out[None, :] > y1[:, None])
        cols_out = (grid.cols.first_out[None, :] < x0[:, None]) | (grid.cols.last_out[None, :] > x1[:, None])
        blocks = sub.undecided(threshold) & (rows_out[:, :, None] | cols_out[:, None, :])
        heavy_box = _count(blocks) > MAX_UNDECIDED * h * w
        heavy[idx] = heavy_box
        px = sub.pixels(blocks & ~heavy_box[:, None, None])
        hit = (px.values > threshold) & px.valid
        m, r = hit.any(dim=2).nonzero(as_tuple=True)
        row_any[idx[px.kk[m]], px.r_idx[m, r]] = True
        m, c = hit.any(dim=1).nonzero(as_tuple=True)
        col_any[idx[px.kk[m]], px.c_idx[m, c]] = True
    return boxes_of_any(row_any, col_any), heavy


@dataclass(frozen=True)
class _Pixels:
    """Upsampled values of some blocks: [M, R, C] values, validity (blocks smaller than R x C), their output row
    [M, R] and column [M, C] indices and their mask index [M]."""

    values: torch.Tensor
    valid: torch.Tensor
    r_idx: torch.Tensor
    c_idx: torch.Tensor
    kk: torch.Tensor


class _BlockGrid:
    """The 2 x 2 source blocks of [K, h, w] logits upsampled to `size`: their value ranges, their pixel counts and,
    for chosen blocks, their upsampled pixels."""

    def __init__(self, x: torch.Tensor, size: tuple[int, int]) -> None:
        k, h, w = x.shape
        self.x, self.size = x, size
        self.rows, self.cols = _Axis.of(h, size[0], x.device), _Axis.of(w, size[1], x.device)
        # block (a, b) = x[a : a + 2, b : b + 2], the last row / column repeated
        padded = F.pad(x[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]
        hi = torch.maximum(padded[:, :-1], padded[:, 1:])
        block_max = torch.maximum(hi[:, :, :-1], hi[:, :, 1:])
        lo = torch.minimum(padded[:, :-1], padded[:, 1:])
        block_min = torch.minimum(lo[:, :, :-1], lo[:, :, 1:])
        margin = (ROUNDING_MARGIN * (1.0 + x.abs().amax(dim=(1, 2))))[:, None, None]
        # every pixel of block (a, b) is above t where lo > t; some may be only where hi > t
        self.lo, self.hi = block_min.sub_(margin), block_max.add_(margin)

    def subset(self, idx: torch.Tensor) -> _BlockGrid:
        """The blocks of the candidates `idx` (mask indices of its pixels count within `idx`)."""
        sub = object.__new__(_BlockGrid)
        sub.x, sub.size, sub.rows, sub.cols = self.x.index_select(0, idx), self.size, self.rows, self.cols
        sub.lo, sub.hi = self.lo.index_select(0, idx), self.hi.index_select(0, idx)
        return sub

    def undecided(self, t: float) -> torch.Tensor:
        """[K, h, w] bool: the block's pixels may lie on both sides of t."""
        return (self.hi > t) & ~(self.lo > t)

    def any_above_along(self, t: float, *, dim: int) -> torch.Tensor:
        """[K, h] (dim 2) or [K, w] (dim 1): whether a block of the row (column) with output pixels has all its
        pixels above t."""
        axis = self.cols if dim == 2 else self.rows
        lo = (
            self.lo
            if bool((axis.outputs > 0).all())
            else self.lo.index_select(dim, (axis.outputs > 0).nonzero().squeeze(1))
        )
        return lo.amax(dim=dim) > t

    def _area_above(self, values: torch.Tensor, t: float) -> torch.Tensor:
        """[K] pixels of the blocks whose `values` are above t (a row's sum is exact in float32: at most W; the
        total in float64)."""
        per_row = torch.gt(values, t, out=torch.empty_like(values)) @ self.cols.outputs.float()
        return (per_row.double() @ self.rows.outputs.double()).round()

    def certain_count(self, t: float) -> torch.Tensor:
        """[K] pixels (float64) certainly above t: those of the blocks with all pixels above t."""
        return self._area_above(self.lo, t)

    def count_bounds(self, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """[K] lower and upper bounds (float64) of the number of pixels above t."""
        return self.certain_count(t), self._area_above(self.hi, t)

    def pixels(self, blocks: torch.Tensor) -> _Pixels:
        """The upsampled pixels of the chosen blocks, group pair by group pair (a source block has 1 x 1 groups
        inside the image, up to 2 x 2 at its edges), with the kernel's weights and operation order (torch.addcmul
        is one fused multiply-add per element, as the compiled kernel's inner loop)."""
        rows, cols, x, device = self.rows, self.cols, self.x, self.x.device
        k, h, w = x.shape
        kk, aa, bb = blocks.nonzero(as_tuple=True)
        n_cols = cols.groups[bb]
        reps = rows.groups[aa] * n_cols
        if bool((reps == 1).all()):  # one group pair per block (inside the image at integer factors)
            gr, gc = rows.first_group[aa], cols.first_group[bb]
        else:
            block = torch.repeat_interleave(torch.arange(len(kk), device=device), reps)
            within = torch.arange(len(block), device=device) - (torch.cumsum(reps, 0) - reps)[block]
            kk, aa, bb, n_cols = kk[block], aa[block], bb[block], n_cols[block]
            gr = rows.first_group[aa] + torch.div(within, n_cols, rounding_mode="floor")
            gc = cols.first_group[bb] + within % n_cols
        # the four source values of each block from the flat logits (one index per value, not three)
        flat = x.reshape(-1)
        top = kk * (h * w) + aa * w
        bottom = top + (rows.group_i1[gr] - aa) * w
        b1 = cols.group_i1[gc]
        x00, x01 = flat.index_select(0, top + bb), flat.index_select(0, top + b1)
        x10, x11 = flat.index_select(0, bottom + bb), flat.index_select(0, bottom + b1)
        w0, w1 = cols.group_w0.index_select(0, gc), cols.group_w1.index_select(0, gc)  # [M, C]
        upper = torch.addcmul(x01[:, None] * w1, x00[:, None], w0)  # [M, C] along row a
        lower = torch.addcmul(x11[:, None] * w1, x10[:, None], w0)  # along row a + 1
        v0, v1 = rows.group_w0.index_select(0, gr), rows.group_w1.index_select(0, gr)  # [M, R]
        values = torch.addcmul(lower[:, None, :] * v1[:, :, None], upper[:, None, :], v0[:, :, None])
        r_idx, c_idx = rows.group_out.index_select(0, gr), cols.group_out.index_select(0, gc)
        r_ok, c_ok = rows.group_ok.index_select(0, gr), cols.group_ok.index_select(0, gc)
        return _Pixels(values, r_ok[:, :, None] & c_ok[:, None, :], r_idx, c_idx, kk)


def _filter_upsampled(
    x: torch.Tensor, size: tuple[int, int], *, threshold: float, offset: float, stability_thresh: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`stable_boxes` the direct way: upsample every mask (a few at a time: their [chunk, H, W] float32
    intermediates stay below glibc's largest mmap threshold, 32 MiB, so they reuse freed heap memory instead of
    faulting in fresh pages)."""
    keep, boxes = [], []
    step = max(1, ((8 << 20) - 1) // (size[0] * size[1]))
    for start in range(0, len(x), step):
        full = upsample(x[start : start + step], size)
        if stability_thresh > 0.0:
            keep.append(stability_score(full, threshold=threshold, offset=offset) >= stability_thresh)
        else:
            keep.append(torch.ones(len(full), dtype=torch.bool, device=x.device))
        boxes.append(boxes_of_logits(full, threshold=threshold))
    return torch.cat(keep), torch.cat(boxes)


def _count(mask: torch.Tensor) -> torch.Tensor:
    """[K] true values of a [K, ...] bool mask (a sum of its bytes: a bool sum converts to int64 first)."""
    return mask.view(torch.uint8).flatten(1).sum(1, dtype=torch.int32)


def _edges(any_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and last index along dim 1 where `any_` [K, N] holds (N and -1 where it never does)."""
    n = any_.shape[1]
    idx = torch.arange(n, device=any_.device)
    return torch.where(any_, idx, n).amin(dim=1), torch.where(any_, idx, -1).amax(dim=1)


def boxes_of_any(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """XYXY boxes [K, 4] of masks given which of their rows [K, H] and columns [K, W] hold a pixel; [0, 0, 0, 0]
    for an empty mask, as `sam2.utils.amg.batched_mask_to_box` gives."""
    y0, y1 = _edges(rows)
    x0, x1 = _edges(cols)
    box = torch.stack([x0, y0, x1, y1], dim=1)
    return torch.where(rows.any(dim=1, keepdim=True), box, torch.zeros_like(box))
