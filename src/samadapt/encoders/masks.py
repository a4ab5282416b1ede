"""SAM 2 automatic masks through the official `sam2` package, cached per image like embeddings.

The model is built with the official hydra config for the registry name (SAM 2 or SAM 2.1, told apart by the
checkpoint's keys) with ``ckpt_path=None``; the user's checkpoint is read with our safe loader and loaded
strictly, so a wrong file gives one clear error instead of a hydra traceback. Masks come from
`fast_masks.FastMaskGenerator` (implementation="fast", the default: the official generator's masks computed with
the image encoder once, batched decoding and filtering on low-resolution logits) or from the official
`sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator` (implementation="official", the reference).

The two implementations give the same masks up to the agreement the tests and `benchmarks/mask_speed.py` check
(every official mask matched at IoU >= 0.9, counts within 5 %), so they share cache entries: the implementation
is not part of the cache key. bf16 precision can move borderline masks, so a non-fp32 precision is.

Cache entries are keyed by the decoded image content, the masker's identity (name, arch, checkpoint sha256,
image size) and every generator setting, and written atomically as compressed ``.npz`` (bit-packed masks).
A random-weight or badly matched model may return zero masks; callers get an empty `Masks` and carry on.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samadapt.encoders.checkpoint import check_finite, describe_contents, load_state_dict_safely, sha256_file
from samadapt.encoders.fast_masks import FastMaskGenerator, resolve_precision
from samadapt.encoders.registry import TINY_ARCHS, get_spec
from samadapt.errors import CheckpointError, ConfigError
from samadapt.store.keys import config_digest, entry_key, image_digest
from samadapt.utils.atomic import atomic_write_bytes

# Bump when the meaning of a cached entry changes.
MASKS_VERSION = "samadapt-masks-1"

# registry name -> official config stem (configs/sam2/<stem>.yaml and configs/sam2.1/sam2.1_<stem>.yaml)
_CONFIG_STEMS = {
    "sam2_hiera_t": "hiera_t",
    "sam2_hiera_s": "hiera_s",
    "sam2_hiera_b+": "hiera_b+",
    "sam2_hiera_l": "hiera_l",
    "medsam2": "hiera_t",  # SAM 2.1 Hiera-T; its registry entry's default size (512) is MedSAM2's
}
IMPLEMENTATIONS = ("fast", "official")
# keys only SAM 2.1 checkpoints carry
_SAM21_KEYS = ("no_obj_embed_spatial", "obj_ptr_tpos_proj.weight")


@dataclass(frozen=True)
class MaskerSettings:
    """SAM2AutomaticMaskGenerator arguments (official defaults) that change the masks, hence the cache key."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.8
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0
    multimask_output: bool = True


@dataclass
class Masks:
    """Masks of one image, largest first: `masks` [K, H, W] bool, `scores` (predicted IoU) and `areas` [K]."""

    masks: np.ndarray
    scores: np.ndarray
    areas: np.ndarray

    def __len__(self) -> int:
        return int(self.masks.shape[0])

    @classmethod
    def empty(cls, height: int, width: int) -> Masks:
        return cls(np.zeros((0, height, width), bool), np.zeros(0, np.float32), np.zeros(0, np.int64))

    @classmethod
    def from_records(cls, records: list[dict[str, Any]], height: int, width: int) -> Masks:
        if not records:
            return cls.empty(height, width)
        records = sorted(records, key=lambda r: -int(r["area"]))
        return cls(
            masks=np.stack([np.asarray(r["segmentation"], bool) for r in records]),
            scores=np.asarray([r["predicted_iou"] for r in records], np.float32),
            areas=np.asarray([r["area"] for r in records], np.int64),
        )

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        k, h, w = self.masks.shape
        np.savez_compressed(
            buf, bits=np.packbits(self.masks.reshape(k, h * w), axis=1), shape=np.array([k, h, w]),
            scores=self.scores, areas=self.areas,
        )  # fmt: skip
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> Masks:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            k, h, w = (int(v) for v in z["shape"])
            masks = np.unpackbits(z["bits"], axis=1, count=h * w).reshape(k, h, w).astype(bool)
            return cls(masks=masks, scores=z["scores"], areas=z["areas"])


class SamMasker:
    """SAM 2 automatic mask generation with a user checkpoint, plus an optional on-disk cache."""

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        name: str,
        arch_name: str,
        image_size: int,
        checkpoint: Path | None,
        checkpoint_sha256: str | None,
        settings: MaskerSettings,
        cache_dir: Path | None = None,
        implementation: str = "fast",
        precision: str = "fp32",
    ) -> None:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        if implementation not in IMPLEMENTATIONS:
            raise ConfigError(
                f"unknown masker implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}"
            )
        self.implementation = implementation
        self.precision = resolve_precision(precision, next(model.parameters()).device)
        if implementation == "official" and self.precision != "fp32":
            raise ConfigError(f"the official masker runs in fp32 only, got precision {precision!r}")
        self.model = model
        self.name = name
        self.arch_name = arch_name
        self.image_size = image_size
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.settings = settings
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.generator: SAM2AutomaticMaskGenerator | None = None
        self.fast: FastMaskGenerator | None = None
        if implementation == "official":
            with warnings.catch_warnings():  # SAM2Transforms calls torch.jit.script, deprecated in torch 2.14
                warnings.simplefilter("ignore", FutureWarning)
                self.generator = SAM2AutomaticMaskGenerator(
                    model, output_mode="binary_mask", **asdict(settings)
                )
            # The predictor hard-codes the feature sizes of a 1024 input; other input sizes need their own.
            self.generator.predictor._bb_feat_sizes = [(image_size // s, image_size // s) for s in (4, 8, 16)]
        else:
            fields = asdict(settings)
            fields.pop("points_per_batch")  # the fast path batches its own way; results do not depend on it
            self.fast = FastMaskGenerator(model, **fields, precision=self.precision, image_size=image_size)
        self.hits = 0
        self.misses = 0

    def cache_key_fields(self) -> dict[str, Any]:
        return {
            "version": MASKS_VERSION,
            "masker": self.name,
            "arch": self.arch_name,
            "image_size": self.image_size,
            "checkpoint_sha256": self.checkpoint_sha256,
            **asdict(self.settings),
            # fp32 keys stay those of the official generator (both implementations share entries)
            **({"precision": self.precision} if self.precision != "fp32" else {}),
        }

    def key(self, image: np.ndarray) -> str:
        return entry_key(image_digest(image), config_digest(self.cache_key_fields()), "sam2_masks")

    def _path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.npz"

    def __call__(self, image: np.ndarray) -> Masks:
        """Masks of one uint8 image (HxW or HxWx3), from the cache when present."""
        image = np.asarray(image)
        path = self._path(self.key(image)) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            try:
                masks = Masks.from_bytes(path.read_bytes())
                self.hits += 1
                return masks
            except (OSError, ValueError, KeyError):
                pass  # a corrupt entry is recomputed and overwritten
        masks = self.generate(image)
        self.misses += 1
        if path is not None:
            atomic_write_bytes(path, masks.to_bytes())
        return masks

    @torch.inference_mode()
    def generate(self, image: np.ndarray) -> Masks:
        rgb = image if image.ndim == 3 else np.repeat(image[:, :, None], 3, axis=2)
        if rgb.dtype != np.uint8 or rgb.shape[2] != 3:
            raise ConfigError(f"masker expects uint8 HxW or HxWx3 images, got {rgb.dtype} {rgb.shape}")
        with quiet_root_logger():
            if self.fast is not None:
                masks, scores = self.fast.generate_arrays(np.ascontiguousarray(rgb))
                records = [
                    {"segmentation": m, "predicted_iou": float(p), "area": int(m.sum())}
                    for m, p in zip(masks, scores, strict=True)
                ]
            else:
                assert self.generator is not None
                records = self.generator.generate(np.ascontiguousarray(rgb))
        return Masks.from_records(records, rgb.shape[0], rgb.shape[1])


@contextmanager
def quiet_root_logger(level: int = logging.INFO):
    """sam2 and open_clip log every call on the root logger; hide records up to `level` while they run."""
    previous = logging.root.manager.disable
    logging.disable(max(previous, level))
    try:
        yield
    finally:
        logging.disable(previous)


def _overrides(arch: dict[str, Any], image_size: int) -> list[str]:
    def seq(values: Any) -> str:
        return "[" + ",".join(str(v) for v in values) + "]"

    trunk = "++model.image_encoder.trunk."
    return [
        f"{trunk}embed_dim={arch['embed_dim']}",
        f"{trunk}num_heads={arch['num_heads']}",
        f"{trunk}stages={seq(arch['stages'])}",
        f"{trunk}global_att_blocks={seq(arch['global_att_blocks'])}",
        f"{trunk}window_pos_embed_bkg_spatial_size={seq(arch['window_pos_embed_bkg_spatial_size'])}",
        f"{trunk}window_spec={seq(arch['window_spec'])}",
        f"++model.image_encoder.neck.backbone_channel_list={seq(arch['backbone_channel_list'])}",
        f"++model.image_size={image_size}",
    ]


def build_sam2_model(
    name: str, *, version: str = "2.1", arch: str | None = None, image_size: int | None = None
) -> tuple[torch.nn.Module, str, int]:
    """The official SAM 2 model (random weights) for a registry name: (model, arch_name, image_size)."""
    spec = get_spec(name)
    if spec.family != "sam2":
        raise ConfigError(f"masker {name!r} is not a SAM 2 model; choose one of {', '.join(_CONFIG_STEMS)}")
    stem = _CONFIG_STEMS[spec.name]
    config = f"configs/sam2.1/sam2.1_{stem}.yaml" if version == "2.1" else f"configs/sam2/sam2_{stem}.yaml"
    numbers = dict(TINY_ARCHS["sam2"]) if arch == "tiny" else dict(spec.arch)
    if arch not in (None, "default", "tiny"):
        raise ConfigError(f"unknown masker arch {arch!r}; use 'tiny' or leave it out")
    size = int(image_size or spec.default_image_size)
    if size % 64 != 0:
        raise ConfigError(f"masker image size must be a multiple of 64, got {size}")
    from sam2.build_sam import build_sam2

    model = build_sam2(
        config, ckpt_path=None, device="cpu", mode="eval", hydra_overrides_extra=_overrides(numbers, size)
    )
    return model, arch or "default", size


def load_masker(
    name: str,
    checkpoint: str | os.PathLike[str] | None,
    *,
    settings: MaskerSettings | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    arch: str | None = None,
    image_size: int | None = None,
    device: str | torch.device = "cpu",
    implementation: str = "fast",
    precision: str = "fp32",
) -> SamMasker:
    """A SAM 2 automatic masker from the user's checkpoint (official ``{"model": ...}`` format, strict keys).

    `arch="tiny"` builds the registry's tiny trunk (tests/demo); `checkpoint=None` keeps random weights.
    `implementation`: "fast" (default) or "official" (sam2's generator, the reference); `precision`: "fp32"
    (exact), "bf16" (fast path only) or "auto" (bf16 where native).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ConfigError(
            f"unknown masker implementation {implementation!r}; use one of {', '.join(IMPLEMENTATIONS)}"
        )
    path = Path(checkpoint).expanduser() if checkpoint is not None else None
    state = None
    version = "2.1"
    if path is not None:
        state = load_state_dict_safely(path)
        if "image_encoder.trunk.patch_embed.proj.weight" not in state:
            raise CheckpointError(
                f"masker checkpoint {path}: expected a SAM 2 model for {name}, found {describe_contents(state)}"
            )
        check_finite(state, path=path)
        version = "2.1" if any(k in state for k in _SAM21_KEYS) else "2.0"
    model, arch_name, size = build_sam2_model(name, version=version, arch=arch, image_size=image_size)
    if state is not None:
        _load_checked(model, state, path=path, name=name, arch_name=arch_name)
    model.to(device).eval().requires_grad_(False)
    return SamMasker(
        model=model,
        name=get_spec(name).name,
        arch_name=arch_name,
        image_size=size,
        checkpoint=path,
        checkpoint_sha256=sha256_file(path) if path is not None else None,
        settings=settings or MaskerSettings(),
        cache_dir=Path(cache_dir) if cache_dir is not None else None,
        implementation=implementation,
        precision=precision,
    )


def _load_checked(
    model: torch.nn.Module, state: dict[str, torch.Tensor], *, path: Path, name: str, arch_name: str
) -> None:
    expected = model.state_dict()
    key = "image_encoder.trunk.patch_embed.proj.weight"
    want, found = expected[key].shape[0], state[key].shape[0]
    blocks_want = len({k.split(".")[3] for k in expected if k.startswith("image_encoder.trunk.blocks.")})
    blocks_found = len({k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")})
    if want != found or blocks_want != blocks_found:
        raise CheckpointError(
            f"masker checkpoint {path}: holds {describe_contents(state)}; {name} ({arch_name}) expects "
            f"embed dim {want}, {blocks_want} blocks"
        )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        what = (
            f"{len(missing)} missing keys (e.g. {missing[:1]}), {len(unexpected)} unexpected (e.g. {unexpected[:1]}), "
            f"{len(wrong)} with another shape (e.g. {wrong[:1]})"
        )
        raise CheckpointError(f"masker checkpoint {path}: does not fit the official {name} model: {what}")
    model.load_state_dict(state, strict=True)


def confident_decoder(
    state: dict[str, torch.Tensor],
    *,
    iou_scale: float = 10.0,
    iou_shift: float = 1.2,
    mask_scale: float = 300.0,
) -> dict[str, torch.Tensor]:
    """Random SAM 2 weights whose mask decoder passes the official thresholds as a trained one does, for tests and
    benchmarks (no trained checkpoint can be downloaded here). An untrained decoder predicts IoU ~0.5 and mask
    logits that hug 0 (stability 0), so the official settings keep nothing. Here: the IoU head's last layer
    x`iou_scale` and +`iou_shift` before its sigmoid (sam2.1 hiera-t on the astronaut: predicted IoU 0.56-0.95,
    66 % of the candidates above 0.8); the hypernetworks' last layers x`mask_scale` (logits |median| 0.06 -> 17,
    stability 0.94-0.98); and the 2 x 2 taps of the two upscaling transposed convolutions averaged (random taps
    make a checkerboard of every low-resolution pixel, 68 % of the 2 x 2 logit blocks straddling a threshold;
    averaged, 12 %: masks with edges, as a trained decoder's smooth ones)."""
    state = dict(state)
    head = "sam_mask_decoder.iou_prediction_head.layers.2"
    state[f"{head}.weight"] = state[f"{head}.weight"] * iou_scale
    state[f"{head}.bias"] = state[f"{head}.bias"] * iou_scale + iou_shift
    for key in [k for k in state if k.startswith("sam_mask_decoder.output_hypernetworks_mlps.")]:
        if ".layers.2." in key:
            state[key] = state[key] * mask_scale
    for key in ("sam_mask_decoder.output_upscaling.0.weight", "sam_mask_decoder.output_upscaling.3.weight"):
        state[key] = state[key].mean(dim=(2, 3), keepdim=True).expand_as(state[key]).contiguous()
    return state


def write_tiny_sam2(
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    version: str = "2.1",
    image_size: int = 128,
    confident: bool = False,
) -> Path:
    """Random weights of the official SAM 2 model with the registry's tiny trunk, saved as ``{"model": ...}``;
    `confident`: with `confident_decoder`'s changes, so that masks pass the official thresholds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, _ = build_sam2_model("sam2_hiera_t", version=version, arch="tiny", image_size=image_size)
    state = model.state_dict()
    if confident:
        state = confident_decoder(state)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state}, path)
    return path
