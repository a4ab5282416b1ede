"""SamViTEncoder against the official segment_anything ImageEncoderViT (the oracle), on tiny configurations."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.image_encoder import get_rel_pos as official_get_rel_pos

from samadapt.encoders.attention import (
    rel_pos_attention,
    rel_pos_terms,
    sdpa_rel_pos_attention,
)
from samadapt.encoders.registry import TINY_ARCHS
from samadapt.encoders.sam_vit import SamViTEncoder, resize_position_tables
from samadapt.errors import ConfigError

TINY = TINY_ARCHS["sam"]


def official_encoder(img_size: int, *, seed: int = 0) -> ImageEncoderViT:
    """The official encoder as build_sam builds it, with every parameter random (SAM zero-initialises the
    position tables, which would hide any mistake in how they are used)."""
    torch.manual_seed(seed)
    enc = ImageEncoderViT(
        img_size=img_size,
        patch_size=TINY["patch_size"],
        embed_dim=TINY["embed_dim"],
        depth=TINY["depth"],
        num_heads=TINY["num_heads"],
        mlp_ratio=TINY["mlp_ratio"],
        out_chans=TINY["out_chans"],
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=TINY["global_attn_indexes"],
        window_size=TINY["window_size"],
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "rel_pos" in name or "pos_embed" in name:
                p.normal_(0.0, 0.5)
            elif "norm" in name or name.startswith(("neck.1", "neck.3")):
                p.add_(0.2 * torch.randn_like(p))
    return enc.eval()


def ours_from(official: ImageEncoderViT, img_size: int) -> SamViTEncoder:
    enc = SamViTEncoder(**TINY, img_size=img_size).eval()
    enc.load_state_dict(official.state_dict(), strict=True)
    return enc


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).abs().max() / ref.abs().max()).item()


def test_state_dict_keys_and_shapes_equal_official() -> None:
    official = ImageEncoderViT(
        img_size=1024,
        embed_dim=64,
        depth=4,
        num_heads=2,
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(1, 3),
    )
    ours = SamViTEncoder(**TINY, img_size=1024)
    ref = {k: tuple(v.shape) for k, v in official.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == ref


@pytest.mark.parametrize("size", [256, 1024])
def test_fp32_and_bf16_match_official(size: int) -> None:
    official = official_encoder(size)
    ours = ours_from(official, size)
    torch.manual_seed(1)
    x = torch.randn(2 if size == 256 else 1, 3, size, size)  # a batch of two exercises batched windows/heads
    with torch.no_grad():
        ref = official(x)
        neck, _ = ours(x)
        assert neck.shape == ref.shape == (x.shape[0], 256, size // 16, size // 16)
        assert rel_err(neck, ref) <= 1e-4
        neck_bf16, _ = ours.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert neck_bf16.dtype == torch.bfloat16
    assert rel_err(neck_bf16, ref) <= 2e-2


def test_layers_return_block_outputs_channel_first() -> None:
    official = official_encoder(256)
    ours = ours_from(official, 256)
    captured: dict[int, torch.Tensor] = {}
    for i in (0, 3):
        official.blocks[i].register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out))
    x = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        official(x)
        _, feats = ours(x, layers=[0, 3])
    assert set(feats) == {0, 3}
    for i, feat in feats.items():
        assert feat.shape == (2, TINY["embed_dim"], 16, 16)
        assert rel_err(feat, captured[i].permute(0, 3, 1, 2)) <= 1e-4


def test_bad_layers_and_input_size_raise() -> None:
    ours = SamViTEncoder(**TINY, img_size=256)
    with pytest.raises(ConfigError, match="out of range"):
        ours(torch.zeros(1, 3, 256, 256), layers=[4])
    with pytest.raises(ConfigError, match="block indices.*'foo'"):
        ours(torch.zeros(1, 3, 256, 256), layers=["foo"])
    with torch.no_grad():  # the store names layers by their decimal strings
        assert set(ours(torch.zeros(1, 3, 256, 256), layers=["1"])[1]) == {1}
    with pytest.raises(ConfigError, match="256x256"):
        ours(torch.zeros(1, 3, 512, 512))


@pytest.mark.parametrize("size", [256, 512])
def test_smaller_input_size_from_1024_weights(size: int) -> None:
    weights = official_encoder(1024).state_dict()
    ours = SamViTEncoder(**TINY, img_size=size).eval()
    ours.load_state_dict(weights, strict=True)  # the pre-hook resizes the position tables
    grid = size // 16
    assert ours.pos_embed.shape == (1, grid, grid, TINY["embed_dim"])
    # pos_embed: bicubic resize of the 64x64 grid.
    expected_pos = F.interpolate(weights["pos_embed"].permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic")
    torch.testing.assert_close(ours.pos_embed.data, expected_pos.permute(0, 2, 3, 1))
    # Global blocks: the resized table gives the official code's own on-the-fly interpolation of the 1024 table.
    for i in TINY["global_attn_indexes"]:
        table = ours.blocks[i].attn.rel_pos_h.data
        assert table.shape == (2 * grid - 1, TINY["embed_dim"] // TINY["num_heads"])
        expected = official_get_rel_pos(grid, grid, weights[f"blocks.{i}.attn.rel_pos_h"])
        torch.testing.assert_close(official_get_rel_pos(grid, grid, table), expected)
    windowed = next(i for i in range(TINY["depth"]) if i not in TINY["global_attn_indexes"])
    assert torch.equal(
        ours.blocks[windowed].attn.rel_pos_w.data, weights[f"blocks.{windowed}.attn.rel_pos_w"]
    )
    # The whole encoder equals the official one built at that size with the same resized weights.
    official_small = official_encoder(size)
    resized = resize_position_tables(
        weights, img_size=size, patch_size=16, global_attn_indexes=TINY["global_attn_indexes"]
    )
    official_small.load_state_dict(resized, strict=True)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert rel_err(ours(x)[0], official_small(x)) <= 1e-4


def test_sdpa_path_equals_cpu_blocked_path() -> None:
    # The GPU path (SDPA with an additive bias) and the CPU path compute the same attention.
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 16 * 16, 8).unbind(0)
    rel_h, rel_w = rel_pos_terms(q, torch.randn(31, 8), torch.randn(31, 8), (16, 16))
    blocked = rel_pos_attention(q, k, v, rel_h, rel_w, scale=8**-0.5)
    sdpa = sdpa_rel_pos_attention(q, k, v, rel_h, rel_w, scale=8**-0.5)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).view(4, 256, 256)
    naive = torch.softmax((q * 8**-0.5) @ k.transpose(1, 2) + bias, dim=-1) @ v
    torch.testing.assert_close(blocked, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sdpa, naive, rtol=1e-5, atol=1e-5)


def test_gradients_match_official() -> None:
    # Frozen use is the norm, but fine-tuning code may backpropagate through the encoder: same gradients.
    official = official_encoder(256)
    ours = ours_from(official, 256)
    x = torch.randn(1, 3, 256, 256)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    official(x_ref).square().sum().backward()
    ours(x_ours)[0].square().sum().backward()
    assert rel_err(x_ours.grad, x_ref.grad) <= 1e-4
    got = ours.blocks[1].attn.rel_pos_h.grad
    assert got is not None and rel_err(got, official.blocks[1].attn.rel_pos_h.grad) <= 1e-4


def test_query_blocked_attention_values_and_gradients() -> None:
    # A grid large enough (40 x 40 tokens) for the query-blocked path that global blocks take at 1024 input.
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 1600, 8, requires_grad=True) for _ in range(3))
    rel_h, rel_w = rel_pos_terms(q, torch.randn(79, 8), torch.randn(79, 8), (40, 40))
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).view(2, 1600, 1600)
    naive = torch.softmax((q * 8**-0.5) @ k.transpose(1, 2) + bias, dim=-1) @ v
    with torch.no_grad():
        fast = rel_pos_attention(q, k, v, rel_h, rel_w, scale=8**-0.5)
    torch.testing.assert_close(fast, naive.detach(), rtol=1e-5, atol=1e-5)
    blocked = rel_pos_attention(q, k, v, rel_h, rel_w, scale=8**-0.5)  # autograd-friendly variant
    torch.testing.assert_close(blocked, naive, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(
        blocked.square().sum(), (q, k, v), retain_graph=True
    )  # rel_h/rel_w are shared
    expected = torch.autograd.grad(naive.square().sum(), (q, k, v))
    for got, ref in zip(grads, expected):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
