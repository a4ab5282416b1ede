"""The few-shot baselines and medfocus-attn pinned to their references' equations, each re-implemented here from
the papers: Tip-Adapter's logits, cache keys and search grid, CoOp's prompt assembly, CLIP-Adapter's residual,
FALIP's attention bias and the blocks that get it; plus the augmented views and the few-shot validation budget.
Models are the tiny random-weight CLIP / SAM 2 saved in their official formats and loaded back."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samadapt.data.splits import few_shot_val_indices
from samadapt.encoders.clip import load_clip, write_tiny_clip
from samadapt.tasks.fewshot.attn_bias import (
    FALIP_BIAS_MAX,
    FocusAttention,
    default_layers,
    patch_focus,
    select_masks,
)
from samadapt.tasks.fewshot.augment import ViewSampler, augmented_view, fit_on_views, view_transform
from samadapt.tasks.fewshot.clip_adapter import ClipAdapterHead
from samadapt.tasks.fewshot.coop import CoOpHead
from samadapt.tasks.fewshot.heads import learned_state
from samadapt.tasks.fewshot.methods import (
    FewShotOptions,
    build_model,
    coop_epochs,
    shots_per_class,
    validation_indices,
)
from samadapt.tasks.fewshot.tip_adapter import (
    TipAdapterHead,
    cache_keys_from_views,
    one_hot,
    search_alpha_beta,
    search_grid,
)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    config, checkpoint = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return load_clip(str(config), checkpoint)


# ---------------------------------------------------------------- Tip-Adapter


def test_tip_adapter_logits_follow_the_paper():
    """logits = 100 f W_c^T + alpha * exp(-beta (1 - f F^T)) L, written out element by element."""
    g = torch.Generator().manual_seed(0)
    f = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    w_c = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    keys = F.normalize(torch.randn(7, 8, generator=g), dim=-1)
    labels = np.array([0, 1, 2, 0, 1, 2, 2])
    alpha, beta = 1.7, 4.2
    head = TipAdapterHead(w_c, keys, one_hot(labels, 3), alpha=alpha, beta=beta)
    expected = torch.zeros(5, 3)
    for i in range(5):
        for c in range(3):
            clip_term = 100.0 * float(f[i] @ w_c[c])
            cache_term = sum(
                math.exp(-beta * (1.0 - float(f[i] @ keys[j]))) for j in range(7) if labels[j] == c
            )
            expected[i, c] = clip_term + alpha * cache_term
    torch.testing.assert_close(head(f), expected, rtol=1e-5, atol=1e-4)


def test_cache_keys_are_the_normalised_mean_of_the_raw_view_features():
    views = torch.randn(10, 4, 6) * torch.tensor([1.0, 3.0, 0.5, 2.0])[None, :, None]
    keys = cache_keys_from_views(views)
    for i in range(4):
        mean = sum(views[v, i] for v in range(10)) / 10
        torch.testing.assert_close(keys[i], mean / mean.norm())


def test_search_grid_is_the_references_200_by_20():
    betas, alphas = search_grid(7.0, 200), search_grid(3.0, 20)
    assert len(betas) == 200 and len(alphas) == 20
    np.testing.assert_allclose(betas, [i * (7.0 - 0.1) / 200 + 0.1 for i in range(200)])
    np.testing.assert_allclose(alphas, [i * (3.0 - 0.1) / 20 + 0.1 for i in range(20)])
    # the default search runs over exactly that grid and returns its best point (first of ties)
    g = torch.Generator().manual_seed(1)
    w_c = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    keys = F.normalize(torch.randn(9, 8, generator=g), dim=-1)
    labels = np.arange(9) % 3
    val = F.normalize(keys + 0.3 * torch.randn(9, 8, generator=g), dim=-1)
    head = TipAdapterHead(w_c, keys, one_hot(labels, 3))
    alpha, beta, acc = search_alpha_beta(head, val, labels)
    best = (-1.0, None)
    for b in betas:
        for a in alphas:
            logits = 100 * val @ w_c.T + a * torch.exp(-b * (1 - val @ keys.T)) @ one_hot(labels, 3)
            score = float((logits.argmax(1).numpy() == labels).mean())
            if score > best[0] + 1e-12:
                best = (score, (float(a), float(b)))
    assert acc == pytest.approx(best[0]) and (alpha, beta) == pytest.approx(best[1])
    assert (float(head.alpha), float(head.beta)) == pytest.approx(best[1])


# ---------------------------------------------------------------- augmented views


def test_augmented_views_are_deterministic_per_seed_index_view(clip):
    transform = view_transform(clip)
    names = [type(t).__name__ for t in transform.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    assert tuple(transform.transforms[0].scale) == (0.5, 1.0)
    assert transform.transforms[3].mean == tuple(clip.preprocess_cfg["mean"])
    image = np.random.default_rng(0).integers(0, 255, (80, 96, 3), dtype=np.uint8)
    a = augmented_view(image, transform=transform, seed=3, index=7, view=0)
    torch.manual_seed(123)  # the global RNG state must not matter
    b = augmented_view(image, transform=transform, seed=3, index=7, view=0)
    c = augmented_view(image, transform=transform, seed=3, index=7, view=1)
    assert a.shape == (3, clip.image_size, clip.image_size)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_epoch_e_trains_on_view_e_mod_v_of_every_image():
    sampler = ViewSampler(5, 3, seed=0)
    orders = []
    for epoch in range(7):
        sampler.set_epoch(epoch)
        flat = list(sampler)
        view = epoch % 3
        assert sorted(flat) == list(range(view * 5, view * 5 + 5))  # every image once, at view e % V
        orders.append(flat)
    sampler.set_epoch(4)
    assert list(sampler) == orders[4]  # a resumed run draws the same order


def test_fit_on_views_keeps_the_last_epoch_without_early_stopping():
    torch.manual_seed(0)
    views = F.normalize(torch.randn(2, 8, 4), dim=-1)
    y = np.arange(8) % 2
    head = torch.nn.Linear(4, 2)
    # the validation set is constant-wrong for class 1: 'best' would stop early, 'last' runs every epoch
    result = fit_on_views(
        head, views=views, train_y=y, val_features=views[0], val_y=1 - y, params=list(head.parameters()),
        epochs=6, lr=0.5, batch_size=4, seed=0, select="last", progress=False,
    )  # fmt: skip
    assert len(result.history) == 6 and result.best_epoch == 5


# ---------------------------------------------------------------- CoOp


def test_coop_prompt_is_sos_context_then_class_token_at_the_end(clip):
    """t_c = [SOS] [V]_1 ... [V]_M [CLASS_c] . [EOS] through CLIP's text transformer, feature at [EOS]."""
    n_ctx = 4
    head = CoOpHead(clip, ["nevus", "melanoma"], n_ctx=n_ctx, scale=10.0)
    with torch.no_grad():
        head.ctx.normal_(generator=torch.Generator().manual_seed(0))
    m = clip.model
    sot, eot = clip.tokenizer.sot_token_id, clip.tokenizer.eot_token_id
    expected = []
    for name in ("nevus", "melanoma"):
        class_ids = clip.tokenizer.encode(name + ".")
        ids = [sot, *([0] * n_ctx), *class_ids, eot]
        ids = torch.tensor(ids + [0] * (m.positional_embedding.shape[0] - len(ids)))
        with torch.no_grad():
            x = m.token_embedding(ids)[None].float()
            x[0, 1 : 1 + n_ctx] = head.ctx  # the learned context right after [SOS], the class name after it
            x = m.transformer(x + m.positional_embedding, attn_mask=m.attn_mask)
            x = m.ln_final(x)[0, 2 + n_ctx + len(class_ids) - 1]  # the [EOS] position
            expected.append(F.normalize(x @ m.text_projection, dim=-1))
    with torch.no_grad():
        torch.testing.assert_close(head.text_features(), torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert head.ctx.shape == (n_ctx, m.token_embedding.weight.shape[1])


def test_coop_epochs_follow_the_papers_table():
    o = FewShotOptions()
    assert [coop_epochs(k, o) for k in (1, 2, 4, 8, 16)] == [50, 50, 100, 100, 200]
    assert coop_epochs(16, FewShotOptions(coop_schedule="fixed", coop_epochs=7)) == 7
    assert shots_per_class(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2])) == 2


# ---------------------------------------------------------------- CLIP-Adapter


def test_clip_adapter_residual_follows_the_paper(clip):
    text = clip.encode_text(["a photo of a nevus", "a photo of a melanoma"])
    head = ClipAdapterHead(text, scale=50.0)
    dim = text.shape[1]
    w1, w2 = head.adapter[0].weight, head.adapter[2].weight
    assert w1.shape == (dim // 4, dim) and w2.shape == (dim, dim // 4)
    assert head.adapter[0].bias is None and head.adapter[2].bias is None
    raw = torch.randn(6, dim) * 3.0  # the reference adapts the raw (unnormalised) image feature
    with torch.no_grad():
        adapted = torch.relu(torch.relu(raw @ w1.T) @ w2.T)
        mixed = 0.2 * adapted + 0.8 * raw
        expected = 50.0 * F.normalize(mixed, dim=-1) @ F.normalize(text, dim=-1).T
        got = head(F.normalize(raw, dim=-1))  # ours sees the normalised feature: same logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_clip_adapter_trains_only_the_adapter_and_saves_it(clip):
    model = build_model("clip-adapter", clip, ["nevus", "melanoma"], FewShotOptions())
    state = learned_state(model)
    assert not any(k.startswith("visual.") for k in state)
    assert {"head.adapter.0.weight", "head.adapter.2.weight", "head.text_features"} <= set(state)
    rebuilt = build_model("clip-adapter", clip, ["nevus", "melanoma"], FewShotOptions(), state=state)
    assert rebuilt.head.adapter[0].weight.shape == state["head.adapter.0.weight"].shape


# ---------------------------------------------------------------- FALIP (medfocus-attn)


def _falip_reference(region: np.ndarray) -> np.ndarray:
    """FALIP's foveal bias on a GxG patch grid: a Gaussian on the region's box, min-max to [0, 0.2] inside."""
    ys, xs = np.nonzero(region)
    cy, cx = (ys.min() + ys.max()) / 2, (xs.min() + xs.max()) / 2
    sy, sx = max((ys.max() - ys.min() + 1) / 2, 0.5), max((xs.max() - xs.min() + 1) / 2, 0.5)
    out = np.zeros(region.shape)
    values = {}
    for y, x in zip(ys, xs, strict=True):
        values[(y, x)] = math.exp(-((y - cy) ** 2 / (2 * sy**2) + (x - cx) ** 2 / (2 * sx**2)))
    low, high = min(values.values()), max(values.values())
    for (y, x), v in values.items():
        out[y, x] = 0.2 * (v - low) / (high - low)
    return out


def test_falip_bias_values_rows_and_heads(clip):
    visual = clip.model.visual
    side = clip.patch_grid
    region = np.zeros((side, side), bool)
    region[0:3, 1:3] = True  # a 3 x 2 patch block
    coverage = torch.as_tensor(region, dtype=torch.float32).reshape(1, -1)
    hooks = FocusAttention(visual, mode="falip")
    try:
        hooks.set(coverage)
        bias = hooks._bias
    finally:
        hooks.remove()
    heads = visual.transformer.resblocks[0].attn.num_heads
    assert bias.shape == (heads, side * side + 1, side * side + 1)
    expected = torch.as_tensor(_falip_reference(region), dtype=torch.float32).reshape(-1)
    for h in range(heads):  # identical across heads
        torch.testing.assert_close(bias[h, 0, 1:], expected)
        assert bias[h, 0, 0] == 0 and (bias[h, 1:] == 0).all()  # only the [CLS] query's row, patch columns
    assert float(bias.max()) == pytest.approx(FALIP_BIAS_MAX) and float(bias.min()) == 0.0


def test_falip_blocks_are_the_last_four_of_twelve_scaled():
    assert default_layers(12, "falip") == [8, 9, 10, 11]
    assert default_layers(24, "falip") == list(range(16, 24))
    assert default_layers(2, "falip") == [1] and default_layers(1, "falip") == [0]
    assert default_layers(3, "suppress") == [0, 1, 2]


def test_falip_bias_reaches_exactly_its_blocks_and_raises_region_attention(clip):
    visual = clip.model.visual
    side = clip.patch_grid
    blocks = visual.transformer.resblocks
    coverage = torch.zeros(1, side * side)
    coverage[0, :3] = 1.0  # first three patches of the top row: the middle one is the region's centre
    seen: dict[int, torch.Tensor | None] = {}
    captured: dict[str, tuple] = {}

    def grab(index):
        def hook(module, args, kwargs):
            seen[index] = kwargs.get("attn_mask")
            if index == len(blocks) - 1:
                captured["args"], captured["mask"] = args, kwargs.get("attn_mask")

        return hook

    handles = [b.attn.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(blocks)]
    hooks = FocusAttention(visual, mode="falip")
    images = torch.randn(1, 3, clip.image_size, clip.image_size)
    try:
        hooks.set(coverage)
        with torch.no_grad():
            visual(images)
        for h in handles:
            h.remove()
        q, k, v = captured["args"]
        attn = blocks[-1].attn
        with torch.no_grad():
            _, biased = attn(
                q, k, v, need_weights=True, average_attn_weights=False, attn_mask=captured["mask"]
            )
            _, plain = attn(q, k, v, need_weights=True, average_attn_weights=False)
    finally:
        hooks.remove()
        for h in handles:
            h.remove()  # removing twice is harmless
    assert hooks.layers == default_layers(len(blocks), "falip")
    assert {i for i, m in seen.items() if m is not None} == set(hooks.layers)
    # softmax(logits + b): each [CLS] attention weight scales by exp(b_k) up to one normaliser per head
    region = coverage.reshape(side, side).numpy() > 0.5
    b = torch.cat(
        [torch.zeros(1), torch.as_tensor(_falip_reference(region), dtype=torch.float32).reshape(-1)]
    )
    ratio = biased[0, :, 0] / plain[0, :, 0]  # [heads, L]: [CLS] query's attention, biased / plain
    torch.testing.assert_close(
        ratio / ratio[:, :1], torch.exp(b)[None].expand_as(ratio), rtol=1e-4, atol=1e-6
    )
    assert (ratio[:, 2] > ratio[:, 1]).all()  # more attention to the region's centre than to its edge


def test_medfocus_attn_changes_logits_relative_to_clip_finetune(clip):
    names = ["nevus", "melanoma"]
    attn = build_model("medfocus-attn", clip, names, FewShotOptions())
    plain = build_model("clip-finetune", clip, names, FewShotOptions())
    plain.visual.load_state_dict(attn.visual.state_dict())  # the same weights
    images = torch.randn(3, 3, clip.image_size, clip.image_size)
    region = torch.zeros(3, clip.patch_grid**2)
    region[:, :2] = 1.0
    with torch.no_grad():
        reference = plain(images)
        focused = attn(images, region)
        no_mask = attn(images, torch.ones_like(region))  # no usable mask: plain CLIP
    assert not torch.allclose(focused, reference, atol=1e-6)
    torch.testing.assert_close(no_mask, reference)
    # the earlier variant stays one option away
    suppress = build_model("medfocus-attn", clip, names, FewShotOptions(attn_mode="suppress"))
    assert suppress.focus.layers == list(range(len(clip.model.visual.transformer.resblocks)))


def test_the_region_is_a_chosen_mask_not_the_union():
    masks = np.zeros((4, 8, 8), bool)
    masks[0] = True  # background (whole image): dropped
    masks[1, :4] = True  # largest non-background (half the image)
    masks[2, 6:, 6:] = True  # small, highest predicted IoU
    masks[3, 6:, :2] = True
    scores = np.array([0.99, 0.5, 0.95, 0.6])
    largest = select_masks(masks, scores, rule="largest", top_k=1)
    assert len(largest) == 1 and (largest[0] == masks[1]).all()
    top_iou = select_masks(masks, scores, rule="top-iou", top_k=2)
    assert (top_iou[0] == masks[2]).all() and (top_iou[1] == masks[3]).all()
    assert len(select_masks(masks, scores, rule="union")) == 3
    from samadapt.tasks.fewshot.attn_bias import MaskChoice

    grid = patch_focus(masks, scores, choice=MaskChoice(), image_size=8, grid=2, resize_mode="squash")
    torch.testing.assert_close(grid, torch.tensor([1.0, 1.0, 0.0, 0.0]))
    none = patch_focus(masks[:1], scores[:1], choice=MaskChoice(), image_size=8, grid=2, resize_mode="squash")
    assert (none == 1).all()  # only background: no focus, zero bias


# ---------------------------------------------------------------- few-shot validation budget


def test_few_shot_val_indices_are_stratified_capped_and_deterministic():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 7)
    val = np.arange(20)[::-1].copy()
    a = few_shot_val_indices(val, labels, per_class=4, seed=5)
    assert list(a) == sorted(a) and set(a) <= set(val)
    counts = np.bincount(labels[a], minlength=3)
    assert list(counts) == [4, 3, 4]
    np.testing.assert_array_equal(a, few_shot_val_indices(val, labels, per_class=4, seed=5))
    assert not np.array_equal(a, few_shot_val_indices(val, labels, per_class=4, seed=6))


def test_validation_budget_is_min_k_and_four_per_class():
    labels = np.array([0] * 10 + [1] * 10)
    val = np.arange(20)
    one_shot = np.array([0, 1])
    two_shot = np.array([0, 0, 1, 1])
    many = np.array([0] * 9 + [1] * 8)
    opts = FewShotOptions()
    assert len(validation_indices(val, labels, one_shot, opts, seed=0)) == 2
    assert len(validation_indices(val, labels, two_shot, opts, seed=0)) == 4
    assert len(validation_indices(val, labels, many, opts, seed=0)) == 8
    full = validation_indices(val, labels, many, FewShotOptions(val_budget="full"), seed=0)
    np.testing.assert_array_equal(full, val)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from samadapt.tasks.fewshot.config import FewShotConfig
    from samadapt.tasks.fewshot.synthetic import CLASS_NAMES, write_toy_npz
    from samadapt.tasks.fewshot.task import FewShotTask

    root = tmp_path_factory.mktemp("toy")
    clip_config, clip_ckpt = write_tiny_clip(root)
    cfg = FewShotConfig(
        data=str(write_toy_npz(root / "toy.npz")), clip=str(clip_config), clip_checkpoint=str(clip_ckpt),
        class_names=list(CLASS_NAMES), method="linear-probe", data_fraction=0.2, progress=False, out=str(root),
    )  # fmt: skip
    return cfg, FewShotTask().prepare(cfg, progress=False), root


def test_augmented_features_are_computed_once_per_view(toy, monkeypatch):
    _, res, _ = toy
    idx = res.dataset.split_indices("train")[:3]
    first = res.augmented_features(idx, views=2, seed=0)
    assert first.shape[:2] == (2, 3)
    decoded = []
    original = res.dataset.image
    monkeypatch.setattr(res.dataset, "image", lambda i: decoded.append(i) or original(i))
    again = res.augmented_features(idx, views=2, seed=0)
    assert decoded == [] and torch.equal(first, again)  # cached: nothing decoded or encoded again
    view = augmented_view(
        original(int(idx[2])), transform=view_transform(res.clip), seed=0, index=int(idx[2]), view=1
    )
    with torch.no_grad():
        direct = res.clip.model.visual(view[None])[0]
    torch.testing.assert_close(first[1, 2], direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first[0, 2], first[1, 2])


def test_run_counts_the_reduced_validation_set(toy):
    from samadapt.engine.lifecycle import execute_run
    from samadapt.tasks.fewshot.task import FewShotTask

    cfg, res, root = toy
    full_val = len(res.dataset.split_indices("val"))
    metrics = execute_run(FewShotTask(), cfg.replace(out=str(root / "run")), prepared=res)
    assert metrics["n_train"] == 2 and metrics["n_val"] == 2 < full_val  # K = 1: one val image per class
    rows = (root / "run" / "predictions.csv").read_text().splitlines()[1:]
    assert sum(r.split(",")[1] == "val" for r in rows) == 2
    cfg_full = cfg.replace(val_budget="full", out=str(root / "full"))
    assert execute_run(FewShotTask(), cfg_full, prepared=res)["n_val"] == full_val
