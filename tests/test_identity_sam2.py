"""Acceptance: samadapt's SAM 2 / 2.1 Hiera-T embedding equals the official SAM2ImagePredictor's.

A seeded random-weight official model (packaged config, official builder) is saved as the official
`{"model": state_dict}` .pt file and loaded back through `samadapt.load_encoder`; the predictor is the oracle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

import samadapt
from samadapt.errors import CheckpointError

# SAM2Transforms scripts its transforms with torch.jit.script, which this torch version flags as deprecated.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _official_checkpoint(config: str, path: Path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_sam2(config, ckpt_path=None, device="cpu")
    # Hiera initialises its position embeddings to zero: perturb every parameter so all of them are exercised.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"model": model.state_dict()}, path)
    return model.eval()


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    return skimage.data.retina()  # 1411 x 1411 RGB uint8 fundus photograph


@pytest.mark.e2e
@pytest.mark.parametrize(
    "config", ["configs/sam2/sam2_hiera_t.yaml", "configs/sam2.1/sam2.1_hiera_t.yaml"], ids=["sam2", "sam2.1"]
)
def test_hiera_t_embedding_equals_official_predictor(tmp_path: Path, retina: np.ndarray, config: str) -> None:
    path = tmp_path / "hiera_t.pt"
    model = _official_checkpoint(config, path, seed=0)
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(retina)
    reference = predictor._features["image_embed"]
    high_res = predictor._features["high_res_feats"]

    encoder = samadapt.load_encoder("sam2_hiera_t", checkpoint=path, precision="fp32")
    # The preprocessing alone is bit-identical to SAM2Transforms.
    assert torch.equal(encoder.preprocess(retina)[0], predictor._transforms(retina))
    out = encoder.embed([retina], layers=["high_res0", "high_res1"])

    assert out["neck"].shape == reference.shape == (1, 256, 64, 64)
    scale = reference.abs().max()
    assert (out["neck"] - reference).abs().max() <= 1e-4 * scale
    for level in (0, 1):
        got, want = out[f"high_res{level}"], high_res[level]
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_loader_refuses_hiera_s_checkpoint_for_hiera_t(tmp_path: Path) -> None:
    path = tmp_path / "sam2_hiera_small.pt"
    torch.manual_seed(0)
    torch.save(
        {"model": build_sam2("configs/sam2/sam2_hiera_s.yaml", ckpt_path=None, device="cpu").state_dict()},
        path,
    )
    with pytest.raises(CheckpointError, match="sam2_hiera_s.*you asked for sam2_hiera_t"):
        samadapt.load_encoder("sam2_hiera_t", checkpoint=path)
