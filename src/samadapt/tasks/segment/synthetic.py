"""Generated ACDC-style data (tests and the demo): short-axis stacks with LV blood pool, myocardium ring, RV.

`write_acdc_like(root, patients=6)` writes ``patientXXX/patientXXX_frame01.nii.gz`` (+ ``_gt``), ``frame10`` and
``Info.cfg`` (ED 1, ES 10) in the ACDC layout, with anisotropic spacing (1.4 x 1.4 x 8 mm by default).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def heart_volume(
    rng: np.random.Generator, *, shape: tuple[int, int, int] = (64, 56, 4), contraction: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, labels uint8) with 0 background, 1 RV, 2 MYO, 3 LV; structures shrink towards the apex."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    cx = shape[0] * rng.uniform(0.5, 0.6)
    cy = shape[1] * rng.uniform(0.42, 0.58)
    r_lv0 = rng.uniform(7.0, 9.5) * contraction
    wall = rng.uniform(3.0, 4.5)
    image = np.zeros(shape, dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for z in range(shape[2]):
        shrink = 1.0 - 0.45 * z / max(1, shape[2] - 1)
        r_lv = r_lv0 * shrink
        d_lv = np.hypot(x - cx, (y - cy) * 1.1)
        rv_c = (cx - r_lv - wall - 4.0 * shrink, cy)
        d_rv = np.hypot((x - rv_c[0]) * 1.5, y - rv_c[1])
        lab = np.zeros(shape[:2], dtype=np.uint8)
        lab[d_rv < (r_lv + 4.0) * 1.1] = 1
        lab[d_lv < r_lv + wall] = 2
        lab[d_lv < r_lv] = 3
        label[:, :, z] = lab
        base = np.choose(lab, [40.0, 170.0, 85.0, 210.0]).astype(np.float32)
        image[:, :, z] = base + 0.15 * x + rng.normal(0.0, 12.0, size=shape[:2])
    return image, label


def write_acdc_like(
    root: str | Path,
    *,
    patients: int = 6,
    shape: tuple[int, int, int] = (64, 56, 4),
    spacing: tuple[float, float, float] = (1.4, 1.4, 8.0),
    seed: int = 0,
) -> Path:
    import nibabel as nib

    root = Path(root)
    rng = np.random.default_rng(seed)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = rng.uniform(-50, 50, size=3)
    for p in range(1, patients + 1):
        pid = f"patient{p:03d}"
        pdir = root / pid
        pdir.mkdir(parents=True, exist_ok=True)
        (pdir / "Info.cfg").write_text(
            "ED: 1\nES: 10\nGroup: NOR\nHeight: 170.0\nNbFrame: 20\nWeight: 70.0\n"
        )
        for frame, contraction in ((1, 1.0), (10, 0.75)):
            image, label = heart_volume(rng, shape=shape, contraction=contraction)
            nib.save(nib.Nifti1Image(image, affine), str(pdir / f"{pid}_frame{frame:02d}.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), str(pdir / f"{pid}_frame{frame:02d}_gt.nii.gz"))
    return root
