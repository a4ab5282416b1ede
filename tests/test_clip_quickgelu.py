"""QuickGELU is decided from the checkpoint's provenance, not its name; a loud warning when it cannot be told.

Every path of `decide_quick_gelu` through `load_clip`, on the tiny open_clip config: the explicit argument, the
config, OpenAI's TorchScript container and extra entries, the release hashes of open_clip's pretrained registry,
and the unknown state dict (with and without 'openai' in its folder name).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU

import samadapt.encoders.clip as clip_module
from samadapt.encoders.checkpoint import sha256_file
from samadapt.encoders.clip import (
    TINY_CLIP_CONFIG,
    QuickGeluUnknownWarning,
    known_clip_releases,
    load_clip,
    write_tiny_clip,
)


def _has_quick_gelu(clip) -> bool:
    return any(isinstance(m, QuickGELU) for m in clip.model.modules())


@pytest.fixture()
def plain(tmp_path: Path) -> tuple[Path, Path]:
    """A config that says nothing about the activation, and a plain open_clip state dict of unknown provenance."""
    _, checkpoint = write_tiny_clip(tmp_path / "w")
    config = tmp_path / "tiny_plain.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    return config, checkpoint


def test_registry_table_holds_openai_hashes_from_their_urls() -> None:
    table = known_clip_releases()
    openai = {v[0]: k for k, v in table.items() if v[1] == "openai"}
    assert {"RN50", "ViT-B-16", "ViT-B-32", "ViT-L-14"} <= set(openai)
    for model, digest in openai.items():
        url = open_clip.get_pretrained_cfg(model, "openai")["url"]
        assert (
            len(digest) == 64 and digest == url.split("/")[-2]
        )  # the path segment open_clip verifies against
        assert table[digest][2] is True  # OpenAI's weights all use QuickGELU
    # open_clip's own early releases: an 8-hex prefix in the file name, QuickGELU or not as the registry says
    short = {v[:2]: v[2] for k, v in table.items() if len(k) == 8}
    assert short[("ViT-B-32", "laion400m_e32")] is True and short[("ViT-B-16", "laion400m_e32")] is False


def test_unknown_state_dict_warns_loudly_and_uses_gelu(plain) -> None:
    config, checkpoint = plain
    with pytest.warns(QuickGeluUnknownWarning, match="CANNOT TELL.*QuickGELU OFF"):
        clip = load_clip(str(config), checkpoint)
    assert not clip.quick_gelu and not _has_quick_gelu(clip)
    assert clip.quick_gelu_source == "unknown (GELU assumed)"


def test_explicit_argument_decides_without_warning(plain) -> None:
    config, checkpoint = plain
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGeluUnknownWarning)
        on = load_clip(str(config), checkpoint, quick_gelu=True)
        off = load_clip(str(config), checkpoint, quick_gelu=False)
    assert on.quick_gelu and _has_quick_gelu(on) and on.quick_gelu_source == "argument"
    assert not off.quick_gelu and not _has_quick_gelu(off)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # same weights, other activation: other embeddings (what the warning is about)
        assert not torch.allclose(on.model.encode_image(x), off.model.encode_image(x))


def test_config_decides(tmp_path: Path, plain) -> None:
    _, checkpoint = plain
    quick = tmp_path / "tiny_quick.json"
    quick.write_text(json.dumps({**TINY_CLIP_CONFIG, "quick_gelu": True}))
    gelu = tmp_path / "tiny_gelu.json"
    gelu.write_text(json.dumps({**TINY_CLIP_CONFIG, "quick_gelu": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGeluUnknownWarning)
        assert load_clip(str(quick), checkpoint).quick_gelu
        clip = load_clip(str(gelu), checkpoint)
    assert not clip.quick_gelu and clip.quick_gelu_source == "the model config sets quick_gelu: false"


def test_openai_container_and_entries_decide(tmp_path: Path) -> None:
    config, checkpoint = write_tiny_clip(tmp_path, openai_format=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGeluUnknownWarning)
        clip = load_clip(str(config), checkpoint)
    assert clip.quick_gelu and "input_resolution" in clip.quick_gelu_source
    # a renamed copy is recognised all the same: the name plays no part
    renamed = tmp_path / "my_weights.pt"
    renamed.write_bytes(checkpoint.read_bytes())
    assert load_clip(str(config), renamed).quick_gelu


def test_release_hash_decides_either_way(monkeypatch: pytest.MonkeyPatch, plain) -> None:
    """A file whose sha256 is a registry release gets that release's activation, whatever its name."""
    config, checkpoint = plain
    digest = sha256_file(checkpoint)
    monkeypatch.setattr(clip_module, "known_clip_releases", lambda: {digest: ("ViT-B-16", "openai", True)})
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGeluUnknownWarning)
        clip = load_clip(str(config), checkpoint)
    assert clip.quick_gelu and _has_quick_gelu(clip)
    assert clip.quick_gelu_source == "sha256 of tiny_clip.pt is open_clip's ViT-B-16 openai release"
    # open_clip's GitHub releases are known by an 8-hex prefix only
    monkeypatch.setattr(
        clip_module, "known_clip_releases", lambda: {digest[:8]: ("ViT-B-16", "laion400m_e32", False)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGeluUnknownWarning)
        assert not load_clip(str(config), checkpoint).quick_gelu


def test_openai_in_the_folder_name_is_only_a_guess(tmp_path: Path, plain) -> None:
    """Hugging Face copies of OpenAI weights keep 'openai' only in the repository folder name: QuickGELU, loudly."""
    config, checkpoint = plain
    folder = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "abc123"
    folder.mkdir(parents=True)
    converted = folder / "open_clip_pytorch_model.bin"
    converted.write_bytes(checkpoint.read_bytes())
    with pytest.warns(QuickGeluUnknownWarning, match="QuickGELU ON"):
        clip = load_clip(str(config), converted)
    assert clip.quick_gelu and clip.quick_gelu_source == "guessed from the file name"
    assert not load_clip(str(config), converted, quick_gelu=False).quick_gelu


def test_random_weights_need_no_decision() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuickGeluUnknownWarning)
        clip = load_clip("ViT-B-32", None)
    assert not clip.quick_gelu and clip.quick_gelu_source == "random weights (no checkpoint)"
