"""`load_encoder` and `Encoder`: a frozen SAM-family image encoder with its checkpoint's own preprocessing."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from samadapt.encoders.checkpoint import (
    check_finite,
    describe_contents,
    load_state_dict_safely,
    sha256_file,
    strip_prefix,
)
from samadapt.encoders.preprocessing import PREPROCESSORS, PreprocessMeta
from samadapt.encoders.registry import TINY_ARCHS, EncoderSpec, get_spec
from samadapt.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

# Bumped when a change to an encoder implementation could change its output: invalidates cached embeddings.
IMPLEMENTATION_VERSION = 1
PRECISIONS = ("fp32", "bf16")
# SAM's ViT needs whole 16-px patches; Hiera tiles an 8x8 window embedding over the S/4 grid, so S % 32 == 0.
SIZE_MULTIPLE = {"sam": 16, "sam2": 32, "mobilesam": 16, "litemedsam": 16, "sam3": 14}
RANDOM_WEIGHTS_SEED = 0


class RandomWeightsWarning(UserWarning):
    """The encoder has random weights: its embeddings mean nothing (tests and the demo only)."""


class Encoder:
    """A frozen image encoder: ``embed(images)`` turns uint8 images of any size into embeddings."""

    def __init__(
        self,
        *,
        spec: EncoderSpec,
        module: nn.Module,
        image_size: int,
        precision: str,
        device: torch.device,
        checkpoint: Path | None,
        checkpoint_sha256: str | None,
        arch_name: str,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.module = module
        self.image_size = image_size
        self.precision = precision
        self.device = device
        self.checkpoint = checkpoint
        self.checkpoint_sha256 = checkpoint_sha256
        self.arch_name = arch_name
        self._preprocess = PREPROCESSORS[spec.preprocessing]

    def __repr__(self) -> str:
        weights = self.checkpoint or "random weights"
        return f"Encoder({self.name}, arch={self.arch_name}, image_size={self.image_size}, {self.precision}, {weights})"

    @property
    def embedding_grid(self) -> int:
        # the spec's stride (16; SAM 3: 14), unless the module says otherwise (LiteMedSAM's stride-1 patch embedding: 4)
        return self.image_size // getattr(self.module, "embedding_stride", self.spec.embedding_stride)

    def cache_key_fields(self) -> dict[str, Any]:
        """Everything that determines the output for a given image: the embedding store's key includes all of it."""
        weights = self.checkpoint_sha256 or f"random-seed-{RANDOM_WEIGHTS_SEED}"
        return {
            "encoder": self.name,
            "arch": self.arch_name,
            "weights": weights,
            "preprocessing": self.spec.preprocessing,
            "image_size": self.image_size,
            "precision": self.precision,
            "implementation": IMPLEMENTATION_VERSION,
        }

    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, PreprocessMeta]:
        return self._preprocess(image, self.image_size)

    @torch.inference_mode()
    def embed_tensor(
        self, batch: torch.Tensor, *, layers: Sequence[int | str] | None = None
    ) -> tuple[torch.Tensor, dict[Any, torch.Tensor]]:
        """Run the module on an already preprocessed float32 batch [B, 3, S, S]; outputs are float32."""
        x = batch.to(self.device)
        if self.device.type == "cuda" and self.precision == "bf16":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                neck, extra = self.module(x, layers=layers)
        else:
            neck, extra = self.module(x.to(self._param_dtype()), layers=layers)
        return neck.float(), {k: v.float() for k, v in extra.items()}

    def embed(
        self,
        images: Iterable[np.ndarray] | np.ndarray,
        *,
        layers: Sequence[int | str] | None = None,
        batch_size: int = 1,
        progress: bool = False,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Embed uint8 images (a list of HxW / HxWx3 arrays, or one [N,H,W(,3)] array).

        Returns float32 [N, 256, S/16, S/16] on the CPU; with ``layers`` a dict with ``"neck"`` and one entry per
        requested layer (block index for SAM, name for SAM 2), each [N, C, h, w].
        """
        items = _as_image_list(images)
        necks: list[torch.Tensor] = []
        extras: dict[str, list[torch.Tensor]] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(items), desc=f"embed {self.name}", unit="img")
        for start in range(0, len(items), max(1, batch_size)):
            chunk = items[start : start + max(1, batch_size)]
            batch = torch.stack([self.preprocess(img)[0] for img in chunk])
            neck, extra = self.embed_tensor(batch, layers=layers)
            necks.append(neck.cpu())
            for key, value in extra.items():
                extras.setdefault(str(key), []).append(value.cpu())
            if bar is not None:
                bar.update(len(chunk))
        if bar is not None:
            bar.close()
        grid = self.embedding_grid
        neck_all = torch.cat(necks) if necks else torch.empty(0, 256, grid, grid)
        if layers is None:
            return neck_all
        out = {"neck": neck_all}
        out.update({k: torch.cat(v) for k, v in extras.items()})
        return out

    def _param_dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


def _as_image_list(images: Iterable[np.ndarray] | np.ndarray) -> list[np.ndarray]:
    """A list stays a list; one array is a single image (HxW, HxWx3) or a batch (NxHxW, NxHxWx3)."""
    if not isinstance(images, np.ndarray):
        return list(images)
    if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] == 3):
        return [images]
    if images.ndim in (3, 4):
        return list(images)
    raise ConfigError(
        f"expected images as a list or an [N,H,W(,3)] array, got an array of shape {images.shape}"
    )


def list_encoders() -> list[str]:
    from samadapt.encoders.registry import ENCODERS

    return list(ENCODERS)


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _build_module(spec: EncoderSpec, arch: dict[str, Any], image_size: int) -> nn.Module:
    if spec.family == "sam":
        from samadapt.encoders.sam_vit import SamViTEncoder

        return SamViTEncoder(**arch, img_size=image_size)
    if spec.family == "sam2":
        from samadapt.encoders.sam2_hiera import Sam2HieraEncoder

        return Sam2HieraEncoder(**arch, img_size=image_size)
    if spec.family in ("mobilesam", "litemedsam"):
        from samadapt.encoders.mobilesam import MobileSamEncoder

        return MobileSamEncoder(**arch, img_size=image_size)
    if spec.family == "sam3":
        from samadapt.encoders.sam3_vit import Sam3ViTEncoder

        return Sam3ViTEncoder(**arch, img_size=image_size)
    raise ConfigError(f"encoder family {spec.family!r} is not supported")


def _encoder_state(spec: EncoderSpec, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Pick the image-encoder tensors out of a full-model or encoder-only state dict."""
    if spec.family == "sam":
        if "image_encoder.patch_embed.proj.weight" in state:
            return strip_prefix(state, "image_encoder.")
        if "patch_embed.proj.weight" in state and "image_encoder.trunk.patch_embed.proj.weight" not in state:
            return dict(state)  # an encoder-only file
    elif spec.family == "sam2":
        from samadapt.encoders.sam2_hiera import select_sam2_encoder_state

        if "image_encoder.trunk.patch_embed.proj.weight" in state:
            return select_sam2_encoder_state(state)
    elif spec.family in ("mobilesam", "litemedsam"):
        from samadapt.encoders.mobilesam import select_mobilesam_encoder_state

        if "image_encoder.patch_embed.seq.0.c.weight" in state:
            return select_mobilesam_encoder_state(state, source=str(path))
    elif spec.family == "sam3":
        from samadapt.encoders.sam3_vit import find_sam3_prefix, select_sam3_encoder_state

        if find_sam3_prefix(state) is not None:
            return select_sam3_encoder_state(state, source=str(path))
    raise CheckpointError(f"checkpoint {path}: holds {describe_contents(state)}; you asked for {spec.name}")


def _check_architecture(
    spec: EncoderSpec, arch: dict[str, Any], state: dict[str, torch.Tensor], path: Path
) -> None:
    """Refuse a model-type/checkpoint mismatch (the most common user error in SAM toolkits) before loading."""
    if spec.family in ("mobilesam", "litemedsam"):
        from samadapt.encoders.mobilesam import describe_tinyvit_state, tinyvit_patch_embed_stride

        if tinyvit_patch_embed_stride(state) != arch.get("patch_embed_stride", 4):
            raise CheckpointError(
                f"checkpoint {path}: holds {describe_tinyvit_state(state)}; you asked for {spec.name}"
            )
    if spec.family == "sam":
        dim = state["patch_embed.proj.weight"].shape[0]
        depth = len({k.split(".", 2)[1] for k in state if k.startswith("blocks.")})
        if dim != arch["embed_dim"] or depth != arch["depth"]:
            full = {"image_encoder." + k: v for k, v in state.items()}
            raise CheckpointError(
                f"checkpoint {path}: holds {describe_contents(full)}; you asked for {spec.name} "
                f"(embed dim {arch['embed_dim']}, {arch['depth']} blocks)"
            )
    elif spec.family == "sam2":
        from samadapt.encoders.sam2_hiera import detect_sam2_arch

        found = detect_sam2_arch({"image_encoder." + k: v for k, v in state.items()})
        expected_dim = arch["embed_dim"]
        dim = (
            state["trunk.patch_embed.proj.weight"].shape[0]
            if "trunk.patch_embed.proj.weight" in state
            else None
        )
        depth = len({k.split(".", 3)[2] for k in state if k.startswith("trunk.blocks.")})
        if dim != expected_dim or depth != sum(arch["stages"]):
            what = found or f"a SAM 2 Hiera image encoder (embed dim {dim}, {depth} blocks)"
            raise CheckpointError(
                f"checkpoint {path}: holds {what}; you asked for {spec.name} "
                f"(embed dim {expected_dim}, {sum(arch['stages'])} blocks)"
            )
    elif spec.family == "sam3":
        dim = state["trunk.patch_embed.proj.weight"].shape[0]
        depth = len({k.split(".", 3)[2] for k in state if k.startswith("trunk.blocks.")})
        if dim != arch["embed_dim"] or depth != arch["depth"]:
            raise CheckpointError(
                f"checkpoint {path}: holds {describe_contents(state)}; you asked for {spec.name} "
                f"(embed dim {arch['embed_dim']}, {arch['depth']} blocks)"
            )


def load_encoder(
    name: str,
    checkpoint: str | Path | None = None,
    *,
    precision: str = "fp32",
    image_size: int | None = None,
    device: str | torch.device | None = "cpu",
    arch: str | dict[str, Any] | None = None,
) -> Encoder:
    """Build a frozen encoder from the registry and load the official checkpoint file into it.

    Args:
        name: registry name, e.g. ``"sam_vit_b"``, ``"medsam_vit_b"``, ``"sam2_hiera_t"``.
        checkpoint: path to the official file (``.pth``/``.pt``/``.safetensors``); ``None`` builds random weights
            and warns loudly (tests and the demo only).
        precision: ``"fp32"`` (exact to the official code) or ``"bf16"`` (fast on CPUs with bf16, autocast on GPUs).
        image_size: square input size S (default 1024); smaller sizes run faster for small medical images, with
            position embeddings interpolated from the 1024 checkpoint.
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a torch.device.
        arch: ``"tiny"`` for the registry's tiny configuration of the same family (random weights, tests/demo),
            or a dict overriding architecture numbers.
    """
    spec = get_spec(name)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    size = int(image_size or spec.default_image_size)
    multiple = SIZE_MULTIPLE[spec.family]
    if size % multiple != 0 or size < 64:
        raise ConfigError(f"{name}: image_size must be a multiple of {multiple} and at least 64, got {size}")
    arch_numbers = dict(spec.arch)
    arch_name = "default"
    if arch == "tiny":
        arch_numbers, arch_name = dict(TINY_ARCHS[spec.family]), "tiny"
    elif isinstance(arch, dict):
        arch_numbers.update(arch)
        arch_name = "custom:" + ",".join(f"{k}={arch[k]}" for k in sorted(arch))
    elif arch not in (None, "default"):
        raise ConfigError(f"unknown arch {arch!r}; use 'tiny', a dict of overrides, or leave it out")

    dev = _resolve_device(device)
    if checkpoint is None:
        warnings.warn(
            f"{name}: NO CHECKPOINT GIVEN, building RANDOM weights (seed {RANDOM_WEIGHTS_SEED}). Embeddings from "
            "random weights are meaningless; pass checkpoint=... for real use.",
            RandomWeightsWarning,
            stacklevel=2,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            module = _build_module(spec, arch_numbers, size)
        path, digest = None, None
    else:
        path = Path(checkpoint).expanduser()
        raw = load_state_dict_safely(path)
        state = _encoder_state(spec, raw, path)
        _check_architecture(spec, arch_numbers, state, path)
        check_finite(state, path=path)
        module = _build_module(spec, arch_numbers, size)
        _load_into(module, state, path=path, spec=spec)
        digest = sha256_file(path)

    module.eval().requires_grad_(False)
    if precision == "bf16" and dev.type == "cpu":
        module = module.to(torch.bfloat16)
    module = module.to(dev)
    return Encoder(
        spec=spec,
        module=module,
        image_size=size,
        precision=precision,
        device=dev,
        checkpoint=path,
        checkpoint_sha256=digest,
        arch_name=arch_name,
    )


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], *, path: Path, spec: EncoderSpec) -> None:
    # Modules that adapt checkpoint tensors (e.g. position embeddings for another input size) say so.
    adapt = getattr(module, "adapt_state_dict", None)
    if adapt is not None:
        state = adapt(state)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0:3]
        raise CheckpointError(
            f"checkpoint {path}: does not fit {spec.name}: {' '.join(line.strip() for line in first)[:400]}"
        ) from None
