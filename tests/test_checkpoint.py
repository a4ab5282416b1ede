"""Checkpoint loading: official containers, architecture mismatch, truncated and hostile files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from samadapt.encoders.checkpoint import describe_contents, load_state_dict_safely
from samadapt.errors import CheckpointError


def _official_sam_state(variant: str) -> dict[str, torch.Tensor]:
    """The full official SAM state dict of a variant, built on the meta device (no 1 GB random init)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        sam = sam_model_registry[variant]()
    sam = sam.to_empty(device="cpu")
    state = sam.state_dict()
    for tensor in state.values():
        tensor.zero_()
    return state


@pytest.fixture(scope="module")
def vit_l_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_l_0b3195.pth"
    torch.save(_official_sam_state("vit_l"), path)
    return path


def test_vit_l_file_asked_as_vit_b_names_both(vit_l_file):
    import samadapt

    with pytest.raises(CheckpointError) as info:
        samadapt.load_encoder("sam_vit_b", checkpoint=vit_l_file)
    message = str(info.value)
    assert "sam_vit_l_0b3195.pth" in message
    assert "vit_l image encoder (embed dim 1024, 24 blocks)" in message
    assert "you asked for sam_vit_b" in message


def test_sam2_file_asked_as_sam_names_family(tmp_path):
    state = {
        "image_encoder.trunk.patch_embed.proj.weight": torch.zeros(96, 3, 7, 7),
        "image_encoder.trunk.blocks.0.norm1.weight": torch.zeros(96),
    }
    path = tmp_path / "sam2_hiera_tiny.pt"
    torch.save({"model": state}, path)
    import samadapt

    with pytest.raises(CheckpointError, match=r"SAM 2 Hiera image encoder .*you asked for sam_vit_b"):
        samadapt.load_encoder("sam_vit_b", checkpoint=path)


@pytest.mark.parametrize("wrapper", ["flat", "model", "module", "state_dict", "safetensors"])
def test_containers_unwrap_to_the_same_state(tmp_path, wrapper):
    state = {
        "image_encoder.patch_embed.proj.weight": torch.randn(8, 3, 16, 16),
        "mask_decoder.x": torch.ones(2),
    }
    path = tmp_path / ("ckpt.safetensors" if wrapper == "safetensors" else "ckpt.pth")
    if wrapper == "flat":
        torch.save(state, path)
    elif wrapper == "model":
        torch.save({"model": state, "epoch": 3}, path)
    elif wrapper == "module":
        torch.save({"model": {"module." + k: v for k, v in state.items()}}, path)
    elif wrapper == "state_dict":
        torch.save({"state_dict": state, "optimizer": {"lr": 1e-3}}, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    loaded = load_state_dict_safely(path)
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value)


def test_truncated_empty_and_non_checkpoint_files(tmp_path):
    good = tmp_path / "good.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.randn(64, 3, 16, 16)}, good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: truncated or corrupt"):
        load_state_dict_safely(truncated)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: file is empty"):
        load_state_dict_safely(empty)
    text = tmp_path / "notes.pth"
    text.write_text("this is not a checkpoint\n" * 10)
    with pytest.raises(CheckpointError, match=r"notes\.pth"):
        load_state_dict_safely(text)
    with pytest.raises(CheckpointError, match="file not found"):
        load_state_dict_safely(tmp_path / "missing.pth")


class _Payload:
    """A pickle that would create a file when unpickled by an unsafe loader."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["torch", "raw-pickle"])
def test_pickle_payload_is_refused_and_never_runs(tmp_path, container):
    marker = tmp_path / "PWNED"
    path = tmp_path / "hostile.pth"
    obj = {"image_encoder.patch_embed.proj.weight": torch.zeros(2), "evil": _Payload(marker)}
    if container == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"hostile\.pth"):
        load_state_dict_safely(path)
    assert not marker.exists(), "the pickle payload was executed"


def test_nan_weights_refused(tmp_path):
    from samadapt.encoders.checkpoint import check_finite

    with pytest.raises(CheckpointError, match=r"'blocks.0.w' contains NaN"):
        check_finite({"blocks.0.w": torch.tensor([1.0, float("nan")])}, path=tmp_path / "x.pth")


def test_describe_contents_names_clip():
    assert "CLIP" in describe_contents({"visual.conv1.weight": torch.zeros(1)})
