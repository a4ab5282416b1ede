"""`samadapt predict --run RUN --input VOLUME.nii.gz --out MASK.nii.gz`: a trained run on a new volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.data.volumes import Volume, read_volume_file
from samadapt.errors import ConfigError, DataError
from samadapt.tasks.segment.heads import EMBEDDING_HEADS, build_head
from samadapt.tasks.segment.inference import predict_volume
from samadapt.training.config import read_run_config
from samadapt.training.weights import load_weights, load_weights_into


class Segmenter:
    """A trained run: `predict(volume) -> label volume` in the volume's own grid."""

    def __init__(self, run: str | Path, *, checkpoint: str | Path | None = None, device: str = "cpu") -> None:
        self.run = Path(run)
        config_path = self.run / "config.yaml"
        self.config: dict[str, Any] = read_run_config(
            self.run, task="segment", required=("head", "num_classes", "image_size")
        )
        self.head_name = self.config["head"]
        if self.head_name in EMBEDDING_HEADS and "encoder" not in self.config:
            raise ConfigError(
                f"{config_path}: missing key encoder (the {self.head_name} head needs its encoder)"
            )
        try:
            self.head = build_head(
                self.head_name,
                num_classes=int(self.config["num_classes"]),
                unet_channels=tuple(self.config.get("unet_channels") or (32, 64, 128, 256, 512)),
            )
            int(self.config["image_size"])
        except (TypeError, ValueError) as exc:  # a hand-edited value of the wrong type
            raise ConfigError(f"{config_path}: a setting has a value of the wrong type ({exc})") from None
        weights_path = self.run / "head.safetensors"
        load_weights_into(self.head, load_weights(weights_path), path=weights_path)
        self.head.eval()
        self.encoder = None
        if self.head_name in EMBEDDING_HEADS:
            from samadapt.encoders import load_encoder

            ckpt = checkpoint or self.config.get("checkpoint")
            if ckpt is not None and not Path(ckpt).is_file():
                raise ConfigError(
                    f"{config_path}: encoder checkpoint {ckpt} not found; pass --checkpoint FILE"
                )
            self.encoder = load_encoder(
                self.config["encoder"],
                ckpt,
                precision=self.config.get("precision", "fp32"),
                image_size=int(self.config["image_size"]),
                arch=self.config.get("encoder_arch"),
                device=device,
            )

    @torch.no_grad()
    def predict(self, volume: Volume) -> np.ndarray:
        return predict_volume(
            self.head,
            head_name=self.head_name,
            volume=volume,
            image_size=int(self.config["image_size"]),
            encoder=self.encoder,
        )


def write_label_volume(reference: Path, labels: np.ndarray, out: Path) -> Path:
    """Write `labels` as NIfTI with the reference image's affine and header (uint8), atomically."""
    import nibabel as nib

    from samadapt.utils.atomic import atomic_path

    ref = nib.load(str(reference))
    target = labels.reshape(ref.shape) if labels.size == int(np.prod(ref.shape)) else labels
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    img = nib.Nifti1Image(target.astype(np.uint8), ref.affine, header=header)
    img.set_qform(ref.get_qform(), code=int(ref.header["qform_code"]))
    img.set_sform(ref.get_sform(), code=int(ref.header["sform_code"]))
    suffix = ".nii.gz" if str(out).endswith(".gz") else ".nii"
    with atomic_path(out) as tmp:
        path = tmp.with_name(tmp.name + suffix)  # nibabel picks compression from the file name
        nib.save(img, str(path))
        path.replace(tmp)
    return out


def predict_file(
    run: str | Path, source: str | Path, out: str | Path, *, checkpoint: str | Path | None = None
) -> Path:
    source, out = Path(source), Path(out)
    if not str(source).endswith((".nii", ".nii.gz")):
        raise DataError(f"{source}: expected a .nii or .nii.gz volume")
    if not str(out).endswith((".nii", ".nii.gz")):
        raise ConfigError(f"--out {out}: expected a .nii or .nii.gz file name")
    image, affine, spacing = read_volume_file(source)
    labels = Segmenter(run, checkpoint=checkpoint).predict(
        Volume(image=image, label=None, affine=affine, spacing=spacing)
    )
    return write_label_volume(source, labels, out)
