"""Shared fixtures: real biomedical images from scikit-image, quiet random-weight warnings."""

from __future__ import annotations

import warnings

import numpy as np
import pytest


@pytest.fixture(scope="session")
def real_images() -> dict[str, np.ndarray]:
    """Real biomedical images shipped with scikit-image (no download): RGB and grey, various sizes."""
    from skimage import data

    return {
        "retina": data.retina(),  # 1411x1411x3 RGB fundus photo
        "ihc": data.immunohistochemistry(),  # 512x512x3 RGB
        "cell": data.cell(),  # 660x550 grey
        "microaneurysms": data.microaneurysms(),  # 102x102 grey
    }


@pytest.fixture(autouse=True)
def _quiet_random_weights():
    from samadapt.encoders import RandomWeightsWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        yield
