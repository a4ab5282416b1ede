"""What the light store dtypes cost in accuracy: float16 and bfloat16 store entries against the float32 values.

Encoders (random weights, saved in the official file formats and loaded back through `samadapt.load_encoder`):
the tiny SAM test configuration, a real-size `segment_anything` vit_b (official builder, position tables made
random as in embed_speed.py) and an official SAM 2.1 Hiera-T (official builder, every parameter perturbed as in
tests/test_identity_sam2.py). Input: scikit-image's retina at 1024. Outputs: the neck / image embedding and
intermediate layers. Each output is written into a store in each dtype and read back (`store.put` / `store.get`,
the code every task reads through). Reported per output: max |x| (float16's range ends at 65504), max abs error
over the reference max, relative RMS error (||err|| / ||ref||).

    python benchmarks/store_dtype_error.py      # writes benchmarks/results/store_dtype_error.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

DTYPES = ("float16", "bfloat16")


def _sam2_checkpoint(path: Path, seed: int) -> None:
    from sam2.build_sam import build_sam2

    torch.manual_seed(seed)
    model = build_sam2("configs/sam2.1/sam2.1_hiera_t.yaml", ckpt_path=None, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save({"model": model.state_dict()}, path)


def encoders(tmp: Path) -> dict[str, tuple[object, list[int | str]]]:
    from embed_speed import make_checkpoint
    from samadapt.encoders import load_encoder

    make_checkpoint(tmp / "sam_vit_b.pth", seed=0)
    _sam2_checkpoint(tmp / "sam2.1_hiera_t.pt", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "sam_vit_b tiny (random)": (load_encoder("sam_vit_b", arch="tiny"), [1, 3]),
            "sam_vit_b (official builder, random)": (
                load_encoder("sam_vit_b", checkpoint=tmp / "sam_vit_b.pth"),
                [2, 5, 8, 11],
            ),
            "sam2.1_hiera_t (official builder, random)": (
                load_encoder("sam2_hiera_t", checkpoint=tmp / "sam2.1_hiera_t.pt"),
                [0, 1, 2, 3, "high_res0", "high_res1"],
            ),
        }


def measure(encoder: object, layers: list[int | str], image: np.ndarray, root: Path) -> dict[str, dict]:
    from samadapt.store import open_store

    outputs = encoder.embed([image], layers=layers)  # type: ignore[attr-defined]
    rows: dict[str, dict] = {}
    with open_store(root) as store:
        for dtype in DTYPES:
            store.put([image], encoder, outputs, store_dtype=dtype)
        for name, value in outputs.items():
            ref = value[0].numpy().astype(np.float64)
            row = {"shape": list(ref.shape), "max_abs_value": float(np.abs(ref).max())}
            for dtype in DTYPES:
                got = store.get(image, encoder, name, store_dtype=dtype).astype(np.float64)
                err = got - ref
                row[dtype] = {
                    "max_abs_err_over_ref_max": float(np.abs(err).max() / np.abs(ref).max()),
                    "relative_rms": float(np.sqrt((err**2).sum() / (ref**2).sum())),
                }
            rows[str(name)] = row
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results" / "store_dtype_error.json"
    )
    args = parser.parse_args()
    from skimage import data

    from samadapt.utils.atomic import atomic_write_json

    image = data.retina()
    result: dict[str, object] = {
        "what": "store round trip (put/get) of encoder outputs for scikit-image's retina at 1024, vs float32",
        "torch": torch.__version__,
        "encoders": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, (encoder, layers) in encoders(Path(tmp)).items():
            print(f"measuring {label}", flush=True)
            rows = measure(encoder, layers, image, Path(tmp) / label.split()[0])
            result["encoders"][label] = rows  # type: ignore[index]
            for name, row in rows.items():
                cells = "  ".join(
                    f"{d}: max {row[d]['max_abs_err_over_ref_max']:.2e} rms {row[d]['relative_rms']:.2e}"
                    for d in DTYPES
                )
                print(f"  {name:10s} max|x| {row['max_abs_value']:9.3g}  {cells}")
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
