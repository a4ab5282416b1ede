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


def test_garbage_and_bare_pickles_get_an_accurate_reason(tmp_path):
    """Random bytes or a web page saved as .pth are "not a checkpoint", not "contains pickled objects"."""
    import numpy as np

    cases = {
        "random.pth": np.random.default_rng(0).bytes(5000),
        "page.pth": b"<html><body>404 Not Found</body></html>\n",
        "bare.pth": pickle.dumps({"w": [1.0, 2.0]}, protocol=4),  # pickle.dump, not torch.save
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in ("random.pth", "page.pth"):
        with pytest.raises(
            CheckpointError, match=rf"{name}: not a PyTorch checkpoint \(unrecognised content"
        ):
            load_state_dict_safely(tmp_path / name)
    with pytest.raises(CheckpointError, match=r"bare\.pth: refused, it is a plain Python pickle"):
        load_state_dict_safely(tmp_path / "bare.pth")


@pytest.mark.parametrize("keep", [40, 10000, 100000])
def test_zip_cut_anywhere_is_reported_as_truncated(tmp_path, keep):
    good = tmp_path / "good.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": torch.randn(64, 3, 16, 16)}, good)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:keep])
    with pytest.raises(CheckpointError, match=rf"cut\.pth: truncated or corrupt \({keep} bytes"):
        load_state_dict_safely(cut)


def _tiny_sam_encoder_state() -> dict[str, torch.Tensor]:
    from samadapt.encoders.registry import TINY_ARCHS
    from samadapt.encoders.sam_vit import SamViTEncoder

    torch.manual_seed(3)
    return SamViTEncoder(**TINY_ARCHS["sam"], img_size=1024).state_dict()


@pytest.mark.parametrize(
    "container", ["full-flat", "encoder-only", "medsam-training", "safetensors", "safetensors-as-pth"]
)
def test_load_encoder_reads_every_container_to_the_same_embedding(tmp_path, container, real_images):
    """Full-model files (only the encoder is used), encoder-only files, DDP/`{"model": ...}` and safetensors."""
    import samadapt

    encoder_state = _tiny_sam_encoder_state()
    full = {f"image_encoder.{k}": v for k, v in encoder_state.items()}
    full["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = torch.randn(2, 128)
    full["mask_decoder.iou_token.weight"] = torch.randn(1, 256)
    path = tmp_path / ("ckpt.safetensors" if container == "safetensors" else "ckpt.pth")
    if container == "full-flat":
        torch.save(full, path)
    elif container == "encoder-only":
        torch.save(encoder_state, path)
    elif container == "medsam-training":
        module_state = {f"module.{k}": v for k, v in full.items()}
        torch.save({"model": module_state, "optimizer": {"lr": 1e-4}, "epoch": 7}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in full.items()}, str(path))
    reference = tmp_path / "reference.pth"
    torch.save(full, reference)

    image = real_images["microaneurysms"]
    got = samadapt.load_encoder("sam_vit_b", checkpoint=path, arch="tiny", image_size=64).embed([image])
    want = samadapt.load_encoder("sam_vit_b", checkpoint=reference, arch="tiny", image_size=64).embed([image])
    assert got.shape == (1, 256, 4, 4)
    assert torch.equal(got, want)


def test_mismatch_message_for_an_unknown_vit_width_names_it_once(tmp_path):
    import samadapt

    path = tmp_path / "custom_vit.pth"
    torch.save({f"image_encoder.{k}": v for k, v in _tiny_sam_encoder_state().items()}, path)
    with pytest.raises(CheckpointError) as info:
        samadapt.load_encoder("medsam_vit_b", checkpoint=path)
    message = str(info.value)
    assert "custom_vit.pth: holds a SAM ViT image encoder (embed dim 64, 4 blocks)" in message
    assert "you asked for medsam_vit_b (embed dim 768, 12 blocks)" in message
