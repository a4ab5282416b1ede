"""`samadapt predict --run RUN --input VOLUME.nii.gz --out MASK.nii.gz`: a trained run on a new volume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.data.volumes import Volume, read_volume_file
from samadapt.errors import ConfigError, DataError
from samadapt.tasks.segment.config import SegmentConfig
from samadapt.tasks.segment.heads import EMBEDDING_HEADS, build_head
from samadapt.tasks.segment.inference import predict_volume
from samadapt.training.weights import load_weights, load_weights_into


class Segmenter:
    """A trained run: `predict(volume) -> label volume` in the volume's own grid."""

    def __init__(
        self, cfg: SegmentConfig, recorded: dict[str, Any], *, run: str | Path, checkpoint: str | None = None,
        device: str = "cpu",
    ) -> None:  # fmt: skip
        self.run = Path(run)
        self.cfg = cfg
        config_path = self.run / "config.yaml"
        num_classes = recorded.get("num_classes")
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(
                f"{config_path}: recorded.num_classes must be an integer >= 2, found {num_classes!r}"
            )
        self.label_names = list(recorded.get("label_names") or [])
        self.head = build_head(cfg.method, num_classes=num_classes, unet_channels=tuple(cfg.unet_channels),
                               mask_tokens_per_class=cfg.mask_tokens_per_class)  # fmt: skip
        weights_path = self.run / "model.safetensors"
        load_weights_into(self.head, load_weights(weights_path), path=weights_path)
        self.head.eval()
        self.encoder = None
        if cfg.method in EMBEDDING_HEADS:
            self.encoder = cfg.replace(
                checkpoint=checkpoint, encoder_image_size=cfg.encoder_size
            ).load_encoder(device)
            fields = recorded.get("encoder_fields")
            if fields is not None and self.encoder.cache_key_fields() != fields:
                raise ConfigError(
                    f"{config_path}: trained with encoder settings {fields}, but the encoder loads as "
                    f"{self.encoder.cache_key_fields()}"
                )

    @torch.no_grad()
    def predict(self, volume: Volume) -> np.ndarray:
        return predict_volume(
            self.head,
            head_name=self.cfg.method,
            volume=volume,
            image_size=self.cfg.input_size,
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
    cfg: SegmentConfig, recorded: dict[str, Any], *, run: str | Path, source: str | Path, out: str | Path,
    output_format: str | None = None, checkpoint: str | None = None, device: str = "cpu",
) -> Path:  # fmt: skip
    """Segment a NIfTI volume or a DICOM series folder; write NIfTI (the input's affine) or a DICOM-SEG that
    references the input series (one segment per structure, named by the run's label names)."""
    source, out = Path(source), Path(out)
    fmt = output_format or ("dicom-seg" if out.suffix.lower() == ".dcm" else "nifti")
    is_series = source.is_dir()
    if not is_series and not str(source).endswith((".nii", ".nii.gz")):
        raise DataError(f"{source}: expected a .nii or .nii.gz volume or a DICOM series folder")
    if fmt == "nifti" and not str(out).endswith((".nii", ".nii.gz")):
        raise ConfigError(f"--out {out}: expected a .nii or .nii.gz file name (or --output-format dicom-seg)")
    if fmt == "dicom-seg" and not is_series:
        raise ConfigError(f"--output-format dicom-seg needs a DICOM series folder as --input, got {source}")
    image, affine, spacing = read_volume_file(source)
    segmenter = Segmenter(cfg, recorded, run=run, checkpoint=checkpoint, device=device)
    labels = segmenter.predict(Volume(image=image, label=None, affine=affine, spacing=spacing))
    if fmt == "dicom-seg":
        from samadapt.data.dicom_seg import write_dicom_seg

        names = segmenter.label_names or [f"label {i}" for i in range(1, int(labels.max()) + 1)]
        return write_dicom_seg(labels, source=source, out=out, label_names=names)
    if is_series:
        return write_label_nifti(labels, affine=affine, out=out)
    return write_label_volume(source, labels, out)


def write_label_nifti(labels: np.ndarray, *, affine: np.ndarray, out: Path) -> Path:
    """Labels as NIfTI with a given affine (a DICOM series input has no NIfTI header to copy), atomically."""
    import nibabel as nib

    from samadapt.utils.atomic import atomic_path

    img = nib.Nifti1Image(labels.astype(np.uint8), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    suffix = ".nii.gz" if str(out).endswith(".gz") else ".nii"
    with atomic_path(out) as tmp:
        path = tmp.with_name(tmp.name + suffix)
        nib.save(img, str(path))
        path.replace(tmp)
    return out
