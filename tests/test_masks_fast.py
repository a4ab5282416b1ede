"""The fast SAM 2 automatic masker against the official `SAM2AutomaticMaskGenerator` (the oracle) on the same
random weights and settings: every official mask matched at IoU >= 0.9 and the counts within 5 %."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sam2.utils.amg import batched_mask_to_box

from samadapt.encoders.fast_masks import resolve_precision
from samadapt.encoders.mask_agreement import agreement, agrees
from samadapt.encoders.masks import MaskerSettings, load_masker, write_tiny_sam2
from samadapt.encoders.upsampled_stats import boxes_of_logits
from samadapt.errors import ConfigError


@pytest.fixture(scope="module")
def sam2_file(tmp_path_factory):
    return write_tiny_sam2(tmp_path_factory.mktemp("sam2") / "tiny_sam2.1.pt")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    image = (rng.random((96, 128)) * 40).astype(np.uint8)
    image[10:60, 20:90] = 230
    image[70:90, 5:40] = 120
    return np.repeat(image[:, :, None], 3, axis=2)


def _pair(sam2_file, settings, **kw):
    common = dict(arch="tiny", image_size=128, settings=settings)
    official = load_masker("sam2_hiera_t", sam2_file, implementation="official", **common)
    fast = load_masker("sam2_hiera_t", sam2_file, **common, **kw)
    return official, fast


# random weights give logits of small magnitude: a small stability offset makes the stability filter bite
SETTINGS = {
    "permissive": MaskerSettings(points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                 box_nms_thresh=0.95),
    "filtering": MaskerSettings(points_per_side=8, pred_iou_thresh=0.5, stability_score_thresh=0.6,
                                stability_score_offset=0.05, box_nms_thresh=0.95),
    "single_mask": MaskerSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                  box_nms_thresh=0.95, multimask_output=False),
    "official_defaults": MaskerSettings(points_per_side=8),
}  # fmt: skip


@pytest.mark.parametrize("name", list(SETTINGS))
def test_fast_masks_agree_with_the_official_generator(sam2_file, image, name):
    official, fast = _pair(sam2_file, SETTINGS[name])
    ref, ours = official.generate(image), fast.generate(image)
    stats = agreement(ref.masks, ours.masks)
    assert agrees(stats), stats
    assert ours.masks.shape[1:] == image.shape[:2]
    if name != "official_defaults":  # thresholds that random weights can pass: there is something to compare
        assert len(ref) >= 1
    if len(ref) == len(ours):  # fp32 runs the same arithmetic: same masks, same order, same scores
        np.testing.assert_array_equal(ref.masks, ours.masks)
        np.testing.assert_allclose(ref.scores, ours.scores, atol=1e-5)


def test_filters_cut_candidates_before_any_full_image_work(sam2_file, image):
    settings = MaskerSettings(points_per_side=8, pred_iou_thresh=0.51, stability_score_thresh=0.6,
                              stability_score_offset=0.05, box_nms_thresh=0.95)  # fmt: skip
    official, fast = _pair(sam2_file, settings)
    assert agrees(agreement(official.generate(image).masks, fast.generate(image).masks))
    counts = fast.fast.last_counts
    assert counts["candidates"] == 3 * 64
    assert counts["points_decoded"] == 64
    assert counts["points_upscaled"] < 64  # points without a candidate above the IoU bar get no mask work
    assert counts["after_iou"] < counts["candidates"]
    assert counts["after_nms"] <= counts["after_stability_bounds"] <= counts["after_iou"]
    assert (
        counts["stability_decided_exactly"]
        <= counts["stability_undecided"]
        <= counts["after_stability_bounds"]
    )


def _scipy_connected_components(mask: torch.Tensor):
    """sam2's CUDA `get_connected_components` ((N, 1, H, W) -> labels, areas; 8-connectivity) with scipy."""
    from scipy import ndimage

    m = mask.to(torch.uint8).cpu().numpy()
    labels = np.zeros(m.shape, np.int32)
    areas = np.zeros(m.shape, np.int32)
    for i in range(m.shape[0]):
        lab, _ = ndimage.label(m[i, 0], structure=np.ones((3, 3)))
        sizes = np.bincount(lab.ravel())
        labels[i, 0] = lab
        areas[i, 0] = np.where(lab > 0, sizes[lab], 0)
    return torch.from_numpy(labels), torch.from_numpy(areas)


def test_small_region_removal_matches_the_official_rule(sam2_file, image, monkeypatch):
    # The official generator fills holes / removes sprinkles through sam2's CUDA extension, absent on CPU
    # installs (it then warns and skips); with that extension's contract provided, it is the oracle.
    import sam2.utils.misc

    monkeypatch.setattr(sam2.utils.misc, "get_connected_components", _scipy_connected_components)
    settings = MaskerSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              box_nms_thresh=0.95, min_mask_region_area=30)  # fmt: skip
    official, fast = _pair(sam2_file, settings)
    ref, ours = official.generate(image), fast.generate(image)
    assert len(ref) >= 1
    assert agrees(agreement(ref.masks, ours.masks))
    plain = load_masker(
        "sam2_hiera_t", sam2_file, arch="tiny", image_size=128,
        settings=MaskerSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                box_nms_thresh=0.95),
    ).generate(image)  # fmt: skip
    assert len(plain) != len(ours) or not np.array_equal(plain.masks, ours.masks)  # the setting did something


def test_boxes_from_logits_equal_the_official_mask_boxes():
    logits = torch.randn(6, 40, 52) - 1.5
    logits[2] = -5.0  # an empty mask
    np.testing.assert_array_equal(
        boxes_of_logits(logits, threshold=0.0).numpy(), batched_mask_to_box(logits > 0.0).numpy()
    )


def test_implementations_share_cache_entries_but_bf16_does_not(sam2_file, image, tmp_path):
    settings = SETTINGS["permissive"]
    common = dict(arch="tiny", image_size=128, settings=settings, cache_dir=tmp_path / "cache")
    fast = load_masker("sam2_hiera_t", sam2_file, **common)
    official = load_masker("sam2_hiera_t", sam2_file, implementation="official", **common)
    assert fast.key(image) == official.key(image)
    first = fast(image)
    assert (fast.hits, fast.misses) == (0, 1)
    np.testing.assert_array_equal(official(image).masks, first.masks)
    assert (official.hits, official.misses) == (1, 0)
    bf16 = load_masker("sam2_hiera_t", sam2_file, precision="bf16", **common)
    assert bf16.key(image) != fast.key(image)
    masks = bf16(image)
    assert masks.masks.shape[1:] == image.shape[:2] and bf16.misses == 1


@pytest.mark.parametrize("name", ["permissive", "filtering"])
def test_bf16_masks_stay_close_to_the_official_generator(sam2_file, image, name):
    # bf16 is not bit-exact (the encoder under autocast, the per-prompt upscaling product rounded): every bf16 mask
    # is an official one (IoU >= 0.9). Random tiny weights give logits near the thresholds, so a borderline mask
    # can drop out: the full bar (counts within 5 %) is asserted where the thresholds leave a margin
    official, bf16 = _pair(sam2_file, SETTINGS[name], precision="bf16")
    assert bf16.fast._product_dtype == torch.bfloat16
    ref, ours = official.generate(image), bf16.generate(image)
    assert len(ref) >= 1 and len(ours) >= 1
    reverse = agreement(ours.masks, ref.masks)
    assert reverse["matched_fraction"] == 1.0 and reverse["min_best_iou"] >= 0.9, reverse
    if name == "filtering":
        stats = agreement(ref.masks, ours.masks)
        assert agrees(stats), stats


def test_unsupported_choices_are_config_errors(sam2_file):
    with pytest.raises(ConfigError, match="crop layers"):
        load_masker("sam2_hiera_t", sam2_file, arch="tiny", image_size=128,
                    settings=MaskerSettings(crop_n_layers=1))  # fmt: skip
    with pytest.raises(ConfigError, match="implementation 'slow'"):
        load_masker("sam2_hiera_t", sam2_file, arch="tiny", image_size=128, implementation="slow")
    with pytest.raises(ConfigError, match="precision 'fp8'"):
        resolve_precision("fp8")
    with pytest.raises(ConfigError, match="fp32 only"):
        load_masker("sam2_hiera_t", sam2_file, arch="tiny", image_size=128, implementation="official",
                    precision="bf16")  # fmt: skip
    assert resolve_precision("auto") == "fp32"  # the CPU decoder is slower in bf16 on every CPU measured


@pytest.mark.parametrize("version", ["2.1", "2.0"])
def test_thin_keys_decoder_equals_the_official_decoder(version):
    from samadapt.encoders.lowrank_decoder import ThinDecoder
    from samadapt.encoders.masks import build_sam2_model

    torch.manual_seed(3)
    model, _, _ = build_sam2_model("sam2_hiera_t", version=version, arch="tiny", image_size=128)
    dec = model.sam_mask_decoder
    with torch.inference_mode():
        embed = torch.randn(1, 256, 8, 8)
        high_res = [torch.randn(1, 32, 32, 32), torch.randn(1, 64, 16, 16)]
        points = torch.rand(10, 1, 2) * 128
        sparse, dense = model.sam_prompt_encoder(
            points=(points, torch.ones(10, 1, dtype=torch.int)), boxes=None, masks=None
        )
        pe = model.sam_prompt_encoder.get_dense_pe()
        _, official, _, _ = dec.predict_masks(
            image_embeddings=embed, image_pe=pe, sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, repeat_image=True, high_res_features=high_res,
        )  # fmt: skip
        heads = [dec.iou_token.weight, dec.mask_tokens.weight]
        if dec.pred_obj_scores:
            heads.insert(0, dec.obj_score_token.weight)
        tokens = torch.cat((torch.cat(heads).unsqueeze(0).expand(10, -1, -1), sparse), dim=1)
        thin = ThinDecoder(dec, image_embed=embed, dense=dense, image_pe=pe)
        ours = torch.cat([thin.iou(thin(chunk)) for chunk in tokens.split(4)])
        # the output tokens and image tokens of a subset, as the official transformer returns them
        pick = torch.tensor([0, 3, 4])
        hs, src = thin.outputs(thin(tokens[:5]), pick)
        hs_ref, src_ref = dec.transformer(embed + dense[pick], pe, tokens[pick])
        # bf16's per-prompt factor product (added to the fp32 shared part): rounded, not rebuilt differently
        state = thin(tokens[:5])
        weight, bias = torch.randn(48, src.shape[-1]), torch.randn(48)
        exact = thin.image_tokens(state, pick, weight=weight, bias=bias)
        rounded = thin.image_tokens(state, pick, weight=weight, bias=bias, product_dtype=torch.bfloat16)
    torch.testing.assert_close(exact, src_ref @ weight.T + bias, atol=1e-4, rtol=1e-4)
    assert rounded.dtype == torch.float32
    assert (rounded - exact).abs().max() <= 0.02 * exact.abs().max()
    assert ours.shape == official.shape == (10, 4)
    torch.testing.assert_close(ours, official, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs, hs_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(src, src_ref, atol=1e-5, rtol=1e-5)


def test_threaded_chunks_give_the_single_stream_result(sam2_file, image, monkeypatch):
    import samadapt.encoders.fast_masks as fm

    settings = MaskerSettings(points_per_side=6, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                              box_nms_thresh=0.95)  # fmt: skip
    _, fast = _pair(sam2_file, settings)
    monkeypatch.setattr(fm, "decode_workers", lambda device, chunks: 2)
    threads = torch.get_num_threads()
    threaded = fast.fast.generate_arrays(image)
    assert torch.get_num_threads() == threads, "the intra-op thread count is restored"
    monkeypatch.setattr(fm, "decode_workers", lambda device, chunks: 1)
    single = fast.fast.generate_arrays(image)
    assert threaded[0].shape[0] > 0
    np.testing.assert_array_equal(threaded[0], single[0])
    np.testing.assert_allclose(threaded[1], single[1], atol=1e-6)


def test_shared_products_are_computed_once_per_image_not_per_chunk(sam2_file, image, monkeypatch):
    """The thin keys' memo holds the per-image shared products; anything keyed on a per-chunk tensor would
    grow it (and the memory held) with every chunk of prompts."""
    import samadapt.encoders.fast_masks as fm

    decoders = []

    class Recording(fm.ThinDecoder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            decoders.append(self)

    monkeypatch.setattr(fm, "ThinDecoder", Recording)
    monkeypatch.setattr(fm, "decode_workers", lambda device, chunks: 1)
    sizes = {}
    for side in (4, 8):  # 16 and 64 prompts: 4 and 16 chunks, every point through the upscaling
        settings = MaskerSettings(points_per_side=side, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                                  box_nms_thresh=0.95)  # fmt: skip
        _, fast = _pair(sam2_file, settings)
        fast.fast.generate_arrays(image)
        assert fast.fast.last_counts["points_upscaled"] == side * side
        sizes[side] = len(decoders[-1].memo._store)
    assert sizes[4] == sizes[8], sizes


@pytest.mark.parametrize("shape", [(96, 128), (150, 211)])
def test_confident_weights_at_the_official_settings(tmp_path, shape, monkeypatch):
    """Weights that pass the official thresholds as trained ones do (`confident_decoder`): masks to compare at the
    official settings, the same masks as the official generator, and the stability filter and boxes decided from
    the low-resolution blocks (nothing upsampled but the kept masks)."""
    import samadapt.encoders.upsampled_stats as us

    path = write_tiny_sam2(tmp_path / "confident.pt", confident=True)
    rng = np.random.default_rng(2)
    gray = (rng.random(shape) * 40).astype(np.uint8)
    gray[10:60, 20:90] = 230
    gray[70:90, 5:40] = 120
    image = np.repeat(gray[:, :, None], 3, axis=2)
    official, fast = _pair(path, MaskerSettings(points_per_side=8))
    fallbacks = []
    real = us._filter_upsampled
    monkeypatch.setattr(
        us, "_filter_upsampled", lambda x, *a, **k: fallbacks.append(len(x)) or real(x, *a, **k)
    )
    ref, ours = official.generate(image), fast.generate(image)
    counts = fast.fast.last_counts
    assert len(ref) >= 1 and counts["after_stability_bounds"] > len(ours)  # masks pass and NMS has work to do
    # the full-image bounds leave candidates undecided; only those NMS would keep are settled exactly
    assert 0 < counts["stability_decided_exactly"] < counts["stability_undecided"], counts
    # decided from the blocks, but for the few candidates mostly undecided at a threshold (3 x 3 pixel blocks)
    assert sum(fallbacks) < counts["after_iou"] / 3
    assert len(ref) == len(ours)
    np.testing.assert_array_equal(ref.masks, ours.masks)
    np.testing.assert_allclose(ref.scores, ours.scores, atol=1e-5)


def _blob_logits(k: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dyadic (exact whatever the CPU's rounding) logits of round masks around 6 centres, stability scores
    around 0.9-0.95, and random predicted IoU: NMS keeps some of each cluster, the bounds decide few."""
    g = torch.Generator().manual_seed(seed)
    clusters = torch.rand(6, 2, generator=g) * 160 + 48
    centre = clusters[torch.randint(0, 6, (k,), generator=g)] + torch.randn(k, 2, generator=g) * 4
    radius = torch.rand(k, generator=g) * 20 + 25
    peak = torch.rand(k, generator=g) * 40 + 20
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    d2 = (yy[None] - centre[:, 0, None, None]) ** 2 + (xx[None] - centre[:, 1, None, None]) ** 2
    x = peak[:, None, None] * (1 - d2 / radius[:, None, None] ** 2)
    return (x.clamp(min=-30) * 64).round() / 64, torch.rand(k, generator=g)


@pytest.mark.parametrize("bar", [0.9, 0.93, 0.95])
@pytest.mark.parametrize("seed", [11, 12])
def test_stable_nms_settles_only_what_nms_keeps_and_equals_filter_then_nms(bar, seed):
    """NMS over the stable and undecided candidates, settling the kept undecided ones exactly, keeps what the
    official order keeps (the exact stability filter on every candidate, then NMS), in the same order; it
    settles fewer candidates than are undecided, and reruns where a kept one turns out unstable."""
    from torchvision.ops.boxes import batched_nms

    import samadapt.encoders.upsampled_stats as us
    from samadapt.encoders.fast_masks import stable_nms

    logits, iou = _blob_logits(40, seed=seed)
    kw = dict(threshold=0.0, offset=1.0, stability_thresh=bar)
    keep, boxes = us.stable_boxes(logits, (1024, 1024), **kw)
    idx = keep.nonzero().squeeze(1)
    b = boxes[idx].float()
    expected = idx[batched_nms(b, iou[idx], torch.zeros_like(b[:, 0]), 0.7)]

    status, boxes = us.stability_status(logits, (1024, 1024), **kw)
    alive = (status != us.UNSTABLE).nonzero().squeeze(1)
    asked = []

    def exact(i):
        asked.append(len(i))
        return us.exactly_stable(logits[alive[i]], (1024, 1024), **kw)

    kept, settled, failed = stable_nms(
        iou[alive], boxes[alive], (status == us.UNDECIDED)[alive], exact=exact, nms_thresh=0.7
    )
    assert len(expected) > 5
    assert torch.equal(alive[kept], expected)
    assert settled == sum(asked) < int((status == us.UNDECIDED).sum())
    if bar == 0.95:
        assert failed > 0 and len(asked) > 1  # kept candidates found unstable: NMS reran without them


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "odd offset", "strided"])
def test_subpixel_to_image_order_is_the_documented_permutation(dtype: torch.dtype, layout: str) -> None:
    from samadapt.encoders.fast_masks import _spatial

    k, side = 3, 32
    flat = torch.randn(k + 1, side * side).to(dtype)
    logits = (
        flat[1:].view(k, side, side)
        if layout != "odd offset"
        else flat.view(-1)[1 : 1 + k * side * side].view(k, side, side)
    )
    if layout == "strided":
        logits = torch.randn(k, side, 2 * side).to(dtype)[:, :, ::2]
    out = _spatial(logits)
    # flat sub-pixel index (y, x, i, j, k, l) holds pixel (4y + 2i + k, 4x + 2j + l)
    src = logits.reshape(k, -1)
    q = side // 4
    for y, x, i, j, kk, ll in [
        (0, 0, 0, 0, 0, 0),
        (1, 2, 1, 0, 1, 1),
        (q - 1, q - 1, 1, 1, 1, 1),
        (2, 0, 0, 1, 1, 0),
    ]:
        flat_index = ((((y * q + x) * 2 + i) * 2 + j) * 2 + kk) * 2 + ll
        assert torch.equal(out[:, 4 * y + 2 * i + kk, 4 * x + 2 * j + ll], src[:, flat_index])
    reference = logits.reshape(k, q, q, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(k, side, side)
    assert torch.equal(out, reference)
