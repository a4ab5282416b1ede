"""CLIP from a local file through open_clip: containers, QuickGELU for OpenAI weights, errors that name the file.
The oracle is open_clip itself: a model built by open_clip with the same weights gives the same embeddings."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from safetensors.torch import save_file

from samadapt.encoders.clip import TINY_CLIP_CONFIG, load_clip, write_tiny_clip
from samadapt.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip"))


def _reference(checkpoint, *, quick_gelu: bool):
    """open_clip's own model with the file's weights (OpenAI's extra entries dropped, as open_clip does for JIT files)."""
    model = open_clip.create_model("tiny_clip", pretrained=None, force_quick_gelu=quick_gelu).eval()
    state = torch.load(checkpoint, weights_only=True)
    model.load_state_dict(
        {k: v for k, v in state.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    )
    return model


def test_open_clip_state_dict_round_trip_equals_open_clip(tiny):
    config, checkpoint = tiny
    clip = load_clip(str(config), checkpoint)
    ref = _reference(checkpoint, quick_gelu=False)
    image = (np.random.default_rng(0).random((90, 70, 3)) * 255).astype(np.uint8)
    x = clip.preprocess(image)
    assert x.shape == (3, 64, 64) and clip.patch_grid == 4 and not clip.quick_gelu
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_image(x[None]), ref.encode_image(x[None]))
        text = open_clip.get_tokenizer("tiny_clip")(["This is a photo of nevus"])
        torch.testing.assert_close(
            clip.encode_text(["This is a photo of nevus"]), ref.encode_text(text, normalize=True)
        )
    assert not any(p.requires_grad for p in clip.model.parameters())
    assert len(clip.checkpoint_sha256) == 64 and clip.identity()["image_size"] == 64


def test_wrapped_and_safetensors_containers(tiny, tmp_path):
    config, checkpoint = tiny
    state = torch.load(checkpoint, weights_only=True)
    wrapped = tmp_path / "epoch_3.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    st = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(st))
    ref = load_clip(str(config), checkpoint).model.state_dict()
    for path in (wrapped, st):
        got = load_clip(str(config), path).model.state_dict()
        assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_openai_format_turns_quick_gelu_on(tmp_path):
    config, checkpoint = write_tiny_clip(tmp_path, openai_format=True)
    clip = load_clip(str(config), checkpoint)
    assert clip.quick_gelu
    assert any(isinstance(m, QuickGELU) for m in clip.model.modules())
    ref = _reference(checkpoint, quick_gelu=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_image(x), ref.encode_image(x))
        off = load_clip(str(config), checkpoint, quick_gelu=False)
        assert not any(isinstance(m, QuickGELU) for m in off.model.modules())
        assert not torch.allclose(off.model.encode_image(x), ref.encode_image(x))


def test_mismatched_and_missing_files_name_the_problem(tiny, tmp_path):
    config, checkpoint = tiny
    wide = dict(TINY_CLIP_CONFIG, vision_cfg=dict(TINY_CLIP_CONFIG["vision_cfg"], width=96, head_width=32))
    wide_config = tmp_path / "wide_clip.json"
    wide_config.write_text(json.dumps(wide))
    with pytest.raises(CheckpointError, match=r"tiny_clip\.pt.*does not fit.*expected shape"):
        load_clip(str(wide_config), checkpoint)
    with pytest.raises(CheckpointError, match="not found"):
        load_clip(str(config), tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="unknown CLIP model"):
        load_clip("ViT-Nope-1", None)
    sam_like = tmp_path / "sam.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.zeros(1)}, sam_like)
    with pytest.raises(CheckpointError, match="no CLIP image tower"):
        load_clip(str(config), sam_like)


def test_openai_torchscript_archive_loads_with_quick_gelu(tmp_path):
    """OpenAI's release files are TorchScript archives holding input_resolution/context_length/vocab_size."""
    config, checkpoint = write_tiny_clip(tmp_path, openai_format=True)
    ref = _reference(checkpoint, quick_gelu=True)
    extra = torch.load(checkpoint, weights_only=True)
    for key in ("input_resolution", "context_length", "vocab_size"):
        if hasattr(ref, key):
            delattr(ref, key)
        ref.register_buffer(key, extra[key])
    x = torch.randn(1, 3, 64, 64)
    archive = tmp_path / "jit" / "ViT-tiny.pt"
    archive.parent.mkdir()
    torch.jit.trace_module(ref, {"encode_image": (x,)}, check_trace=False).save(str(archive))
    clip = load_clip(str(config), archive)
    assert clip.quick_gelu and clip.quick_gelu_source == "ViT-tiny.pt is an OpenAI TorchScript archive"
    with torch.no_grad():
        torch.testing.assert_close(clip.model.encode_image(x), ref.encode_image(x))
