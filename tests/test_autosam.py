"""AutoSAM head against the official segment_anything / sam2 mask decoders (oracles), and head sizes."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from samadapt.encoders.checkpoint import load_state_dict_safely
from samadapt.errors import CheckpointError
from samadapt.tasks.segment.autosam import AutoSamHead, load_sam_decoder_weights
from samadapt.tasks.segment.conv_heads import CnnHead, LinearHead


def _official_tiny_sam(image_size: int = 128):
    """The official `Sam` with a tiny image encoder and SAM's real-size prompt encoder and mask decoder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = image_size // 16
    torch.manual_seed(1)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2, embed_dim=32, img_size=image_size, mlp_ratio=4, num_heads=2, patch_size=16, qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=(1,),
            window_size=4, out_chans=256,
        ),
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(image_size, image_size), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256),
    )  # fmt: skip
    with torch.no_grad():  # random, non-default values everywhere (LayerNorms start at 1/0 otherwise)
        for p in sam.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sam.eval()


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    sam = _official_tiny_sam()
    path = tmp_path_factory.mktemp("ckpt") / "sam_tiny.pth"
    torch.save(sam.state_dict(), path)  # the official release format: a flat state dict
    return sam, path


def test_decoder_tensors_equal_the_official_checkpoint(official_checkpoint):
    _, path = official_checkpoint
    state = load_state_dict_safely(path)
    head = AutoSamHead(num_classes=4)
    loaded = load_sam_decoder_weights(head, state, source=str(path))
    own = head.state_dict()
    expected = [
        k for k in own if k.startswith(("transformer.", "output_upscaling.", "output_hypernetworks_mlps."))
    ]
    assert set(expected) <= set(loaded)
    for name in expected:
        assert torch.equal(own[name], state["mask_decoder." + name]), name
    assert torch.equal(own["no_mask_embed.weight"], state["prompt_encoder.no_mask_embed.weight"])
    assert torch.equal(
        own["pe_layer.positional_encoding_gaussian_matrix"],
        state["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"],
    )
    # the per-class tokens are new (the paper's choice): shapes follow the classes, not the checkpoint
    # (2 mask tokens per class by default, as the reference code)
    assert own["iou_token.weight"].shape == (4, 256) and own["mask_tokens.weight"].shape == (8, 256)


def test_each_class_is_the_official_decoder_run_with_that_class_tokens(official_checkpoint):
    sam, path = official_checkpoint
    head = AutoSamHead(num_classes=3, mask_tokens_per_class=4).eval()
    load_sam_decoder_weights(head, load_state_dict_safely(path), source=str(path))
    dec = sam.mask_decoder
    with torch.no_grad():  # give every class SAM's own tokens, scaled differently so classes differ
        for c in range(3):
            head.iou_token.weight[c] = dec.iou_token.weight[0] * (1 + c)
            head.mask_tokens.weight[4 * c : 4 * c + 4] = dec.mask_tokens.weight * (1 + c)
    emb = torch.randn(2, 256, 8, 8)
    with torch.no_grad():
        ours = head(emb)
        assert ours.shape == (2, 3, 32, 32)
        for c in range(3):
            dec.iou_token.weight.copy_(head.iou_token.weight[c : c + 1])
            dec.mask_tokens.weight.copy_(head.mask_tokens.weight[4 * c : 4 * c + 4])
            for b in range(2):  # the official decoder takes one image (and a batch of prompts) per call
                masks, _ = dec.predict_masks(
                    image_embeddings=emb[b : b + 1],
                    image_pe=sam.prompt_encoder.get_dense_pe(),
                    sparse_prompt_embeddings=torch.empty(1, 0, 256),
                    dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(
                        1, -1, 1, 1
                    ).expand(1, -1, 8, 8),
                )
                torch.testing.assert_close(ours[b, c], masks[0, 0], rtol=1e-4, atol=1e-4)


def test_sam2_decoder_tensors_load_with_renamed_mlp_keys():
    from sam2.modeling.sam.mask_decoder import MaskDecoder
    from sam2.modeling.sam.transformer import TwoWayTransformer

    torch.manual_seed(2)
    dec = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048,
                      num_heads=8), transformer_dim=256, use_high_res_features=True, pred_obj_scores=True)  # fmt: skip
    state = {"sam_mask_decoder." + k: v for k, v in dec.state_dict().items()}
    state["sam_prompt_encoder.no_mask_embed.weight"] = torch.randn(1, 256)
    head = AutoSamHead(num_classes=2)
    loaded = load_sam_decoder_weights(head, state, source="sam2.pt")
    own = head.state_dict()
    assert torch.equal(
        own["transformer.layers.1.mlp.lin2.weight"],
        state["sam_mask_decoder.transformer.layers.1.mlp.layers.1.weight"],
    )
    assert torch.equal(own["output_upscaling.3.weight"], state["sam_mask_decoder.output_upscaling.3.weight"])
    assert len([k for k in loaded if k.startswith("transformer.")]) == len(
        [k for k in own if k.startswith("transformer.")]
    )


def test_checkpoint_without_a_mask_decoder_is_refused():
    with pytest.raises(CheckpointError, match="no SAM mask decoder"):
        load_sam_decoder_weights(
            AutoSamHead(num_classes=2), {"image_encoder.x": torch.zeros(1)}, source="enc.pth"
        )


def test_head_sizes_match_the_paper():
    n_cnn = sum(p.numel() for p in CnnHead(num_classes=4).parameters())
    n_lin = sum(p.numel() for p in LinearHead(num_classes=4).parameters())
    assert n_cnn == pytest.approx(20.7e6, rel=0.01)
    assert n_lin == pytest.approx(75e3, rel=0.01)
    x = torch.randn(1, 256, 4, 4)
    assert CnnHead(num_classes=4)(x).shape == LinearHead(num_classes=4)(x).shape == (1, 4, 16, 16)


def test_linear_head_starts_from_sams_upscaling_path(official_checkpoint):
    _, path = official_checkpoint
    state = load_state_dict_safely(path)
    head = LinearHead(num_classes=4)
    loaded = load_sam_decoder_weights(head, state, source=str(path))
    assert loaded == sorted(k for k in head.state_dict() if k.startswith("output_upscaling."))
    for name in loaded:
        assert torch.equal(head.state_dict()[name], state["mask_decoder." + name])
