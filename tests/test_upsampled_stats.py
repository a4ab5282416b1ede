"""The stability filter and boxes from the low-resolution logits against the official way: upsample every mask
with `F.interpolate` (as `SAM2Transforms.postprocess_masks`), then `calculate_stability_score` /
`batched_mask_to_box`."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sam2.utils.amg import batched_mask_to_box, calculate_stability_score

import samadapt.encoders.upsampled_stats as us


def _smooth_logits(
    k: int, *, seed: int, side: int = 256, scale: float = 17.0, dyadic: bool = False
) -> torch.Tensor:
    """Mask-like logits: a coarse random field upsampled, so that a few percent of the 2 x 2 blocks hold an edge;
    one empty mask, one full mask and one tiny mask among them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(k, 1, side // 32, side // 32, generator=g) * scale
    x = F.interpolate(coarse, (side, side), mode="bicubic", align_corners=False)[:, 0] + 0.3
    x[0] = -5.0
    x[1] = 5.0
    x[2] = -5.0
    x[2, 10:12, 20:23] = 9.0
    if dyadic:  # multiples of 1/64: every product with the 4x weights (multiples of 1/8) is exact, FMA or not
        x = (x * 64).round() / 64
    return x


def _official(x: torch.Tensor, size: tuple[int, int], threshold: float, offset: float):
    full = F.interpolate(x[:, None], size, mode="bilinear", align_corners=False)[:, 0]
    return calculate_stability_score(full, threshold, offset), batched_mask_to_box(full > threshold), full


def _assert_same(x, size, threshold=0.0, offset=1.0, *, bars=None, exact=True):
    """`stable_boxes` against the official arithmetic at several stability bars: around the candidates' own scores
    (so that the count bounds straddle the bar and the pixels are computed) and beside them."""
    ref_stab, ref_boxes, _ = _official(x, size, threshold, offset)
    finite = ref_stab[ref_stab.isfinite()]
    if bars is None:
        bars = [0.0, 0.5, 0.95, *finite.tolist(), *(finite + 1e-6).clamp(max=1).tolist()]
    for bar in bars:
        keep, boxes = us.stable_boxes(x, size, threshold=threshold, offset=offset, stability_thresh=bar)
        ref_keep = ref_stab >= bar if bar > 0 else torch.ones_like(ref_stab, dtype=torch.bool)
        if exact:
            assert torch.equal(keep, ref_keep), bar
        else:  # a pixel next to a threshold may round the other way: only candidates at the bar itself may differ
            assert torch.equal(
                keep | ((ref_stab - bar).abs() < 1e-5), ref_keep | ((ref_stab - bar).abs() < 1e-5)
            )
        torch.testing.assert_close(boxes[keep & ref_keep], ref_boxes[keep & ref_keep], rtol=0, atol=0)


def test_square_4x_upsampling_is_exact():
    # dyadic logits: the comparison does not depend on how a CPU rounds
    _assert_same(_smooth_logits(12, seed=0, dyadic=True), (1024, 1024))


def test_the_exact_scores_where_the_bounds_do_not_decide():
    x = _smooth_logits(12, seed=6, dyadic=True)
    stab = _official(x, (1024, 1024), 0.0, 1.0)[0]
    grid = us._BlockGrid(x, (1024, 1024))
    (inter_lo, inter_hi), (union_lo, union_hi) = grid.count_bounds(1.0), grid.count_bounds(-1.0)
    finite = stab.isfinite()
    # the bounds hold and are not trivially wide
    assert torch.all((inter_lo / union_hi)[finite] <= stab[finite])
    assert torch.all(stab[finite] <= (inter_hi / union_lo)[finite])
    assert torch.all((inter_hi - inter_lo) < 0.2 * 1024 * 1024)


@pytest.mark.parametrize("size", [(1024, 1024), (683, 1024), (1024, 777), (2048, 1500), (600, 1100)])
def test_any_upsampled_size_matches(size):
    _assert_same(_smooth_logits(8, seed=1), size, exact=False)


@pytest.mark.parametrize("threshold,offset", [(0.0, 1.0), (0.5, 0.25), (-2.0, 3.0)])
def test_other_thresholds_and_offsets(threshold, offset):
    _assert_same(_smooth_logits(6, seed=2, dyadic=True), (1024, 1024), threshold, offset)


def test_only_the_edges_are_computed_for_smooth_masks(monkeypatch):
    """Smooth masks take the block path (nothing is upsampled); logits that hug the threshold everywhere fall back
    to upsampling where the blocks would cost more, with the same result."""

    def no_upsampling(*args, **kwargs):
        raise AssertionError("the smooth masks were upsampled")

    x = _smooth_logits(6, seed=3, dyadic=True)
    with monkeypatch.context() as m:
        m.setattr(us, "_filter_upsampled", no_upsampling)
        m.setattr(us, "upsample", no_upsampling)
        _assert_same(x, (1024, 1024))
    noisy = (torch.randn(4, 256, 256, generator=torch.Generator().manual_seed(4)) * 64).round() / 64 + 0.5
    calls = []
    real = us._filter_upsampled
    monkeypatch.setattr(us, "_filter_upsampled", lambda *a, **k: calls.append(1) or real(*a, **k))
    _assert_same(noisy, (1024, 1024), bars=[0.0, 0.3, 0.5])
    assert calls, "noisy logits should take the upsampling path"


def test_only_the_mostly_undecided_candidates_are_upsampled(monkeypatch):
    """In a chunk of smooth and noisy candidates, only the noisy ones are upsampled, and everything is exact."""
    smooth = _smooth_logits(6, seed=7, dyadic=True)
    noisy = (torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(8)) * 64).round() / 64 + 0.5
    x = torch.cat([smooth[:3], noisy[:1], smooth[3:], noisy[1:]])
    upsampled = []
    real = us._filter_upsampled
    monkeypatch.setattr(
        us, "_filter_upsampled", lambda c, *a, **k: upsampled.append(c.clone()) or real(c, *a, **k)
    )
    _assert_same(x, (1024, 1024), bars=[0.0, 0.3, 0.5, 0.95])
    assert upsampled
    for chunk in upsampled:  # only ever the noisy candidates
        assert all(any(torch.equal(c, n) for n in noisy) for c in chunk)


def test_small_outputs_are_upsampled_directly():
    x = _smooth_logits(5, seed=5, side=64)
    _assert_same(x, (80, 70), exact=False)  # less than 4 output pixels per logit
