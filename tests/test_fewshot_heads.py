"""Few-shot heads against their definitions: Tip-Adapter's formula by hand, the linear probe against
scikit-learn, CoOp's text path against open_clip's own encode_text."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from samadapt.encoders.clip import load_clip, write_tiny_clip
from samadapt.tasks.fewshot.coop import CoOpHead
from samadapt.tasks.fewshot.linear_probe import fit_linear_probe
from samadapt.tasks.fewshot.tip_adapter import TipAdapterHead, one_hot, search_alpha_beta


def test_tip_adapter_matches_formula_on_hand_example():
    # two classes, 2-D unit features; cache of three training images
    s = 1 / math.sqrt(2)
    f = torch.tensor([[1.0, 0.0], [s, s]])
    w_c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [s, s]])
    values = one_hot(np.array([0, 1, 1]), 2)
    head = TipAdapterHead(w_c, keys, values, alpha=2.0, beta=3.0)
    got = head(f)
    # image 0: f.W = [1, 0]; affinities to keys [1, 0, s] -> exp(-3 (1 - a)) = [1, e^-3, e^(-3(1-s))]
    c0 = [1.0, math.exp(-3.0) + math.exp(-3.0 * (1 - s))]
    # image 1: f.W = [s, s]; affinities [s, s, 1]
    c1 = [math.exp(-3.0 * (1 - s)), math.exp(-3.0 * (1 - s)) + 1.0]
    expected = torch.tensor(
        [[100 * 1.0 + 2 * c0[0], 100 * 0.0 + 2 * c0[1]], [100 * s + 2 * c1[0], 100 * s + 2 * c1[1]]]
    )
    torch.testing.assert_close(got, expected)
    assert not head.cache_keys.requires_grad
    assert TipAdapterHead(w_c, keys, values, learn_keys=True).cache_keys.requires_grad


def test_alpha_beta_search_picks_a_grid_point_that_fixes_the_zero_shot_error():
    w_c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # held-out image sits nearer class 0 in text space but is identical to a cached class-1 image
    f = torch.nn.functional.normalize(torch.tensor([[0.8, 0.6]]), dim=-1)
    head = TipAdapterHead(w_c, f.clone(), one_hot(np.array([1]), 2), alpha=0.0, beta=1.0)
    assert int(head(f).argmax()) == 0
    alpha, beta, acc = search_alpha_beta(
        head, f, np.array([1]), alphas=np.array([0.0, 50.0]), betas=np.array([1.0])
    )
    assert (alpha, beta, acc) == (50.0, 1.0, 1.0) and int(head(f).argmax()) == 1


def test_linear_probe_probabilities_equal_scikit_learn():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    y = (x[:, 0] + 0.3 * rng.normal(size=40) > 0).astype(int)
    head, info = fit_linear_probe(x[:30], y[:30], x[30:], y[30:], num_classes=2, seed=0, c_grid=(1.0,))
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # the shared probe standardises the features (scaler fitted on the training features), then fits
    ref = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=3000, random_state=0)).fit(
        x[:30], y[:30]
    )
    probs = torch.softmax(head(torch.from_numpy(x[30:])), dim=1).detach().numpy()
    np.testing.assert_allclose(probs, ref.predict_proba(x[30:]), atol=1e-5)
    assert info["C"] == 1.0 and info["val_accuracy"] == pytest.approx(ref.score(x[30:], y[30:]))
    # three classes, one of them missing from the training subset: it can never be predicted
    y3 = np.where(y == 1, 2, 0)
    head3, _ = fit_linear_probe(x[:30], y3[:30], x[30:], y3[30:], num_classes=3, seed=0, c_grid=(1.0,))
    assert (head3(torch.from_numpy(x)).argmax(1) != 1).all()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    config, checkpoint = write_tiny_clip(tmp_path_factory.mktemp("clip"))
    return load_clip(str(config), checkpoint)


def test_coop_text_path_equals_open_clip_encode_text(tiny_clip):
    """With the context set to the embeddings of "a photo of a", CoOp's prompt is the real sentence."""
    head = CoOpHead(tiny_clip, ["nevus", "melanoma"], n_ctx=4, scale=10.0)
    context_ids = tiny_clip.tokenize(["a photo of a"])[0, 1:5]
    with torch.no_grad():
        head.ctx.copy_(tiny_clip.model.token_embedding(context_ids))
    expected = tiny_clip.encode_text(["a photo of a nevus.", "a photo of a melanoma."])
    torch.testing.assert_close(head.text_features(), expected, atol=1e-5, rtol=1e-5)
    # only the context learns; the frozen CLIP stays out of the head's state
    feats = torch.nn.functional.normalize(torch.randn(3, expected.shape[1]), dim=-1)
    head.train()
    head(feats).sum().backward()
    assert head.ctx.grad is not None and head.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.model.parameters())
    assert set(head.state_dict()) == {"ctx", "scale"}


def test_coop_refuses_prompts_longer_than_the_context(tiny_clip):
    from samadapt.errors import ConfigError

    with pytest.raises(ConfigError, match="context length"):
        CoOpHead(tiny_clip, ["a very long class name " * 3], n_ctx=16, scale=1.0)


def test_coop_recipe_is_sgd_with_constant_warmup():
    """CoOp (Zhou et al. 2022): SGD, lr 0.002, cosine, first epoch at a constant 1e-5."""
    from samadapt.errors import ConfigError
    from samadapt.tasks.fewshot.methods import FewShotOptions, _coop_optimizer
    from samadapt.tasks.fewshot.optimize import train_module

    recipe = _coop_optimizer(FewShotOptions())
    assert recipe["optimizer"] == "sgd" and recipe["warmup_epochs"] == 1 and recipe["warmup_lr"] == 1e-5
    x = torch.randn(16, 4)
    y = (x[:, 0] > 0).long().numpy()

    def moved(**kwargs):
        torch.manual_seed(0)
        head = torch.nn.Linear(4, 2)
        start = head.weight.detach().clone()
        train_module(
            head, lambda m, f: m(f), train=(x,), train_y=y, val=(x,), val_y=y, params=list(head.parameters()),
            epochs=1, lr=2e-3, batch_size=16, patience=5, monitor="accuracy", seed=0, progress=False, **kwargs,
        )  # fmt: skip
        return float((head.weight.detach() - start).abs().max())

    warm = moved(optimizer="sgd", momentum=0.9, weight_decay=0.0, warmup_epochs=1, warmup_lr=1e-5)
    cold = moved(optimizer="sgd", momentum=0.9, weight_decay=0.0)
    assert 0 < warm < cold / 100  # the warmup epoch runs at 1e-5 instead of 2e-3
    with pytest.raises(ConfigError, match="coop-optimizer"):
        _coop_optimizer(FewShotOptions(coop_optimizer="adam"))
