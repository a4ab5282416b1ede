"""ONNX export: tiny random-weight models from the official builders, run by onnxruntime on new random inputs and
compared with torch (fp32; tolerance: max abs error <= 1e-4 of the output's largest value)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from samadapt.encoders.encoder import load_encoder
from samadapt.encoders.export_mode import plain_torch_ops
from samadapt.encoders.preprocessing import IMAGENET_MEAN, SAM_PIXEL_MEAN, SAM_PIXEL_STD
from samadapt.errors import ConfigError
from samadapt.export import check_export, check_onnx, export_encoder_onnx, export_module, export_module_onnx

TOL = 1e-4  # of the output's max |value|


def _fresh(*shape: int, seed: int = 7) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _assert_close(result: dict) -> None:
    assert result["passed"], result
    assert result["err_over_max"] <= TOL, result


def _check(path, fn, inputs) -> dict:
    with torch.no_grad():
        out = fn(*inputs)
    ref_max = float(out.abs().max())
    assert ref_max > 0
    result = check_onnx(path, fn, inputs, atol=TOL * ref_max)
    # the measured numbers (pytest -s shows them; the README quotes them)
    print(f"{path.name}: max abs err {result['max_abs_err']:.2e}, {result['err_over_max']:.2e} of the max")
    _assert_close(result)
    return result


def _sam_preprocess_from_json(image: np.ndarray, pre: dict) -> np.ndarray:
    """What a non-Python user would write from preprocessing.json (here with PIL/numpy)."""
    from PIL import Image

    assert pre["resize"]["rule"] == "longest_side" and pre["pad"]["rule"] == "bottom_right"
    size = pre["image_size"]
    if image.ndim == 2:  # "a grey image is replicated to 3 channels"
        image = np.repeat(image[:, :, None], 3, axis=2)
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR), dtype=np.float32)
    x = (resized - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    out = np.full((size, size, 3), pre["pad"]["value"], np.float32)
    out[:nh, :nw] = x
    return out.transpose(2, 0, 1)[None]


def test_sam_vit_encoder_onnx_and_preprocessing_json(tmp_path, real_images):
    encoder = load_encoder("sam_vit_b", None, arch="tiny", image_size=64)
    info = export_encoder_onnx(encoder, tmp_path / "sam.onnx")
    print(f"sam.onnx (export check): {info['check']['err_over_max']:.2e} of the max")
    assert info["check"]["passed"] and info["check"]["err_over_max"] <= TOL
    assert info["input"]["shape"] == ["batch", 3, 64, 64] and info["output"]["shape"] == ["batch", 256, 4, 4]
    pre = json.loads((tmp_path / "preprocessing.json").read_text())
    assert pre["name"] == "sam" and pre["image_size"] == 64
    assert pre["mean"] == list(SAM_PIXEL_MEAN) and pre["std"] == list(SAM_PIXEL_STD)
    # new batch size, real images preprocessed from the JSON alone: onnxruntime == the encoder's own embed()
    images = [real_images["ihc"][:100, :60], real_images["microaneurysms"], real_images["ihc"][:50]]
    batch = np.concatenate([_sam_preprocess_from_json(img, pre) for img in images])
    np.testing.assert_allclose(
        batch, torch.stack([encoder.preprocess(i)[0] for i in images]).numpy(), atol=1e-5
    )
    reference = encoder.embed(images)
    result = check_onnx(tmp_path / "sam.onnx", lambda _: reference, (torch.from_numpy(batch),), atol=0.0)
    assert result["outputs"][0]["shape"] == [3, 256, 4, 4]
    print(f"sam.onnx, real images via preprocessing.json: {result['err_over_max']:.2e} of the max")
    assert result["err_over_max"] <= TOL, result


def test_sam2_encoder_onnx(tmp_path):
    encoder = load_encoder("sam2_hiera_t", None, arch="tiny", image_size=64)
    info = export_encoder_onnx(encoder, tmp_path / "sam2.onnx", dynamic_batch=True)
    assert info["check"]["passed"], info["check"]
    pre = json.loads((tmp_path / "preprocessing.json").read_text())
    assert pre["name"] == "sam2" and pre["mean"] == list(IMAGENET_MEAN) and pre["pad"] == {"rule": "none"}
    images = _fresh(3, 3, 64, 64)
    _check(tmp_path / "sam2.onnx", lambda x: encoder.embed_tensor(x)[0], (images,))


def test_mobilesam_encoder_onnx_keeps_modules_in_eval(tmp_path):
    # TinyViT has BatchNorm: the export must leave every submodule of the frozen encoder in eval mode
    encoder = load_encoder("mobilesam_vit_t", None, arch="tiny", image_size=64)
    info = export_encoder_onnx(encoder, tmp_path / "mobilesam.onnx")
    print(f"mobilesam.onnx (export check): {info['check']['err_over_max']:.2e} of the max")
    assert info["check"]["passed"], info["check"]
    assert not any(m.training for m in encoder.module.modules())


def test_export_restores_each_submodule_mode(tmp_path):
    head, shape = _head("linear")
    head.train()
    head.final.eval()  # a mixed state, as a frozen part inside a trained model
    export_module(
        head,
        (torch.zeros(shape),),
        tmp_path / "h.pt",
        format="torchscript",
        input_names=["e"],
        output_names=["l"],
    )
    assert head.training and head.output_upscaling.training and not head.final.training


def test_export_mode_is_plain_and_exact():
    encoder = load_encoder("sam_vit_b", None, arch="tiny", image_size=128)  # windowed blocks pad 8 -> 14
    x = _fresh(2, 3, 128, 128)
    fast = encoder.embed_tensor(x)[0]
    with plain_torch_ops():
        plain = encoder.embed_tensor(x)[0]
    torch.testing.assert_close(plain, fast, rtol=0, atol=1e-5 * float(fast.abs().max()))


def test_bf16_encoder_is_refused(tmp_path):
    encoder = load_encoder("sam_vit_b", None, arch="tiny", image_size=64, precision="bf16")
    with pytest.raises(ConfigError, match="fp32"):
        export_encoder_onnx(encoder, tmp_path / "x.onnx", check=False)


def _head(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    from samadapt.tasks.segment.autosam import AutoSamHead
    from samadapt.tasks.segment.conv_heads import CnnHead, LinearHead
    from samadapt.tasks.segment.heads import _unet

    torch.manual_seed(0)
    if name == "autosam":
        return AutoSamHead(num_classes=3, mlp_dim=256), (2, 256, 4, 4)
    if name == "linear":
        return LinearHead(num_classes=3), (2, 256, 4, 4)
    if name == "cnn":
        return CnnHead(num_classes=3, top_channels=8), (2, 256, 4, 4)
    return _unet(num_classes=3, unet_channels=(8, 16, 32)), (2, 1, 32, 32)


@pytest.mark.parametrize("name", ["autosam", "linear", "cnn", "unet"])
def test_segmentation_heads_onnx(tmp_path, name):
    head, shape = _head(name)
    head.eval()
    path = export_module_onnx(
        head,
        (torch.zeros(shape),),
        tmp_path / f"{name}.onnx",
        input_names=["embedding"],
        output_names=["logits"],
        dynamic_axes={"embedding": {0: "batch"}},
    )
    result = _check(path, head, (_fresh(3, *shape[1:]),))
    scale = 4 if name != "unet" else 1
    assert result["outputs"][0]["shape"] == [3, 3, shape[2] * scale, shape[3] * scale]


def test_slca_classifier_onnx(tmp_path):
    from samadapt.tasks.classify.backbone import build_backbone, resolve_stages, stage_infos
    from samadapt.tasks.classify.model import SlcaClassifier
    from samadapt.tasks.classify.slca import window_pool

    torch.manual_seed(0)
    backbone = build_backbone("resnet18", num_classes=3, image_size=64)
    stages = resolve_stages("all", stage_infos(backbone))
    model = SlcaClassifier(backbone=backbone, stages=stages, sam_channels=256, reduction=32).eval()
    sam = window_pool(_fresh(2, 256, 4, 4, seed=1), window=2, pooling="avg")
    path = export_module_onnx(
        model,
        (torch.zeros(2, 3, 64, 64), sam),
        tmp_path / "slca.onnx",
        input_names=["images", "sam_windows"],
        output_names=["logits"],
        dynamic_axes={"images": {0: "batch"}, "sam_windows": {0: "batch"}},
    )
    images, windows = _fresh(3, 3, 64, 64), window_pool(_fresh(3, 256, 4, 4, seed=2), window=2, pooling="avg")
    _check(path, model, (images, windows))
    # the SLCA hooks are in the exported graph: other SAM windows change the ONNX logits
    other = check_onnx(path, model, (images, windows.flip(-1) * 3), atol=TOL)
    assert other["passed"] and not np.allclose(
        _run_onnx(path, images, windows), _run_onnx(path, images, windows.flip(-1) * 3)
    )


def _run_onnx(path, *inputs: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]


@pytest.mark.parametrize("focus", [False, True], ids=["plain", "medfocus-attn"])
def test_clip_classifier_onnx(tmp_path, focus):
    from samadapt.encoders.clip import load_clip, write_tiny_clip
    from samadapt.tasks.fewshot.attn_bias import FocusAttention
    from samadapt.tasks.fewshot.heads import ClipClassifier, PromptHead

    config, checkpoint = write_tiny_clip(tmp_path / "clip")
    clip = load_clip(str(config), checkpoint)
    head = PromptHead(clip.encode_text(["a photo of a benign lesion", "a photo of a melanoma"]), scale=100.0)
    hooks = FocusAttention(clip.model.visual, strength=5.0) if focus else None
    model = ClipClassifier(clip.model.visual, head, focus=hooks).eval()
    patches = (64 // 16) ** 2
    example = (torch.zeros(2, 3, 64, 64), torch.ones(2, patches)) if focus else (torch.zeros(2, 3, 64, 64),)
    names = ["images", "focus_grids"][: len(example)]
    path = export_module_onnx(
        model,
        example,
        tmp_path / "clip.onnx",
        input_names=names,
        output_names=["logits"],
        dynamic_axes={name: {0: "batch"} for name in names},
    )
    images = _fresh(3, 3, 64, 64)
    inputs = (images, (_fresh(3, patches, seed=3) > 0).float()) if focus else (images,)
    result = _check(path, model, inputs)
    assert result["outputs"][0]["shape"] == [3, 2]
    if focus:  # the attention bias is in the graph: another focus gives other logits
        assert not np.allclose(_run_onnx(path, *inputs), _run_onnx(path, images, torch.ones(3, patches)))


@pytest.mark.parametrize("fmt", ["torchscript", "torch_export"])
def test_fallback_formats_checked(tmp_path, fmt):
    head, shape = _head("linear")
    head.eval()
    suffix = {"torchscript": ".pt", "torch_export": ".pt2"}[fmt]
    path = export_module(
        head,
        (torch.zeros(shape),),
        tmp_path / f"head{suffix}",
        format=fmt,
        input_names=["embedding"],
        output_names=["logits"],
        dynamic_axes={"embedding": {0: "batch"}},
    )
    inputs = (_fresh(3, *shape[1:]),)
    with torch.no_grad():
        ref_max = float(head(*inputs).abs().max())
    result = check_export(path, head, inputs, atol=TOL * ref_max)
    _assert_close(result)
    assert result["outputs"][0]["shape"] == [3, 3, 16, 16]


def test_bad_dynamic_axis_and_format_are_config_errors(tmp_path):
    head, shape = _head("linear")
    with pytest.raises(ConfigError, match="at least 2"):
        export_module_onnx(
            head,
            (torch.zeros(1, *shape[1:]),),
            tmp_path / "x.onnx",
            input_names=["embedding"],
            output_names=["logits"],
            dynamic_axes={"embedding": {0: "batch"}},
        )
    with pytest.raises(ConfigError, match="unknown export format"):
        export_module(
            head,
            (torch.zeros(shape),),
            tmp_path / "x",
            format="tflite",
            input_names=["e"],
            output_names=["l"],
        )


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["sam_vit_b", "sam2_hiera_t"])
def test_real_size_encoder_onnx(tmp_path, name):
    """Real architecture at 1024 (random weights): the exported graph equals the fast torch path."""
    encoder = load_encoder(name, None, image_size=1024)
    info = export_encoder_onnx(encoder, tmp_path / f"{name}.onnx", dynamic_batch=False)
    print(f"{name} at 1024: {info['check']}")
    assert info["check"]["passed"] and info["check"]["err_over_max"] <= TOL, info["check"]
