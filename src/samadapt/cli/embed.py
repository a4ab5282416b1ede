"""`samadapt embed`: embed a dataset with a frozen encoder into the embedding store (resumable, torchrun-able).

samadapt embed --encoder sam_vit_b --checkpoint sam_vit_b_01ec64.pth --data data/breastmnist.npz --store cache/
torchrun --nproc_per_node 4 -m samadapt embed ... --device cuda      # one GPU per process, see docs/distributed.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

# Imports of torch and the store happen in run(): `samadapt --help` must stay fast.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--encoder", required=True, help="encoder name, e.g. sam_vit_b, medsam_vit_b, sam2_hiera_t"
    )
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="official checkpoint file (default: random weights)"
    )
    parser.add_argument(
        "--data", required=True, help="dataset: image folder, ImageFolder, MedMNIST .npz, CSV, ISIC"
    )
    parser.add_argument(
        "--data-format",
        default=None,
        choices=("images", "imagefolder", "medmnist", "manifest", "isic"),
        help="dataset layout (default: detected); e.g. images for unlabelled images in per-patient subfolders",
    )
    from samadapt.engine.flags import DeprecatedFlag

    parser.add_argument(
        "--store",
        dest="cache",
        type=Path,
        default=None,
        help="embedding store directory (created if missing)",
    )
    parser.add_argument("--cache", dest="cache", type=Path, action=DeprecatedFlag, canonical="--store",
                        help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="encoder precision; auto (default): bf16 where this CPU/GPU runs it natively and faster, else fp32 "
        "(the resolved value is what the store records; SAMADAPT_PRECISION=fp32|bf16 overrides auto)",
    )
    parser.add_argument(
        "--store-dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="dtype of new store entries (default float16: half the bytes of float32; reads are float32)",
    )
    parser.add_argument(
        "--encoder-image-size", dest="image_size", type=int, default=None,
        help="square encoder input size (default: the encoder's, 1024)",
    )  # fmt: skip
    parser.add_argument("--image-size", dest="image_size", type=int, action=DeprecatedFlag,
                        canonical="--encoder-image-size", help=argparse.SUPPRESS)  # fmt: skip
    parser.add_argument(
        "--batch-size", type=int, default=1, help="images per encoder call and per written shard"
    )
    parser.add_argument("--layers", default=None, help="also store these intermediate layers, e.g. 3,6")
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or auto (under torchrun: one GPU per process)"
    )
    parser.add_argument(
        "--encoder-arch",
        "--arch",
        dest="arch",
        choices=("default", "tiny"),
        default="default",
        help="tiny: random-weight test model (same flag as in `samadapt train`)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def parse_layers(text: str | None) -> list[int | str] | None:
    """'3,6' -> [3, 6] (SAM block indices); names such as SAM 2 levels stay strings."""
    from samadapt.errors import ConfigError

    if text is None or not text.strip():
        return None
    items = [item.strip() for item in text.split(",")]
    if any(not item for item in items):
        raise ConfigError(f"--layers {text!r}: expected a comma-separated list such as 3,6")
    return [int(item) if item.lstrip("-").isdigit() else item for item in items]


def _check_layer_names(encoder: str, layers: list[int | str] | None) -> None:
    """SAM ViT layers are block indices: refuse names here, before the data and the encoder are loaded."""
    from samadapt.encoders.registry import get_spec
    from samadapt.errors import ConfigError

    spec = get_spec(encoder)
    names = [layer for layer in layers or [] if isinstance(layer, str)]
    if spec.family == "sam" and names:
        raise ConfigError(
            f"--layers: {spec.name} layers are transformer block indices such as 2,5 "
            f"(the neck output is always stored); got {names}"
        )


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from samadapt.data.readers import read_dataset
    from samadapt.encoders import load_encoder
    from samadapt.encoders.precision import decide_precision
    from samadapt.errors import ConfigError
    from samadapt.store import embed_dataset, open_store
    from samadapt.store.distributed import init_from_env, rank_and_world, shutdown
    from samadapt.utils.threads import apply_default_threads

    if args.cache is None:
        raise ConfigError("--store DIR is required (the embedding store directory)")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible to this process")
    layers = parse_layers(args.layers)
    _check_layer_names(args.encoder, layers)
    started = time.perf_counter()
    device = init_from_env(device)
    try:
        rank, world = rank_and_world()
        if str(device).startswith("cpu"):
            apply_default_threads()  # the CPUs this process may use (affinity, cgroup quota), not the host's
        decision = decide_precision(args.precision, device)
        if rank == 0 and args.precision == "auto":
            print(f"samadapt embed: {decision.describe(args.precision)}", flush=True)
        # before the (slow) encoder build: bad data fails fast
        dataset = read_dataset(args.data, format=args.data_format)
        encoder = load_encoder(
            args.encoder,
            checkpoint=args.checkpoint,
            precision=decision.precision,
            image_size=args.image_size,
            device=device,
            arch=None if args.arch == "default" else args.arch,
        )
        table = embed_dataset(
            dataset,
            encoder,
            args.cache,
            layers=layers,
            batch_size=args.batch_size,
            progress=not args.no_progress,
            store_dtype=args.store_dtype,
        )
        if rank == 0:
            with open_store(args.cache) as store:
                entries = len(store)
            shapes = ", ".join(f"{name} {tuple(table[name].shape[1:])}" for name in table.outputs)
            per_image = (
                f"{table.seconds / table.computed:.3f} s per computed image"
                if table.computed
                else "nothing to compute"
            )
            print(
                f"samadapt embed: {len(table)} images with {encoder.name} ({encoder.precision}, {encoder.image_size}px, "
                f"{world} process{'es' if world > 1 else ''} on {device}): computed {table.computed}, "
                f"reused {table.reused}; {per_image}; total {time.perf_counter() - started:.1f} s"
            )
            print(
                f"samadapt embed: store {Path(args.cache).resolve()} ({entries} entries); outputs: {shapes}; "
                f"new entries {args.store_dtype}; {table.bytes_per_image:,.0f} bytes per image on disk"
            )
    finally:
        shutdown()
    return 0


if __name__ == "__main__":  # python -m samadapt.cli.embed ... (same as `samadapt embed ...`)
    import sys

    from samadapt.cli.main import main

    sys.exit(main(["embed", *sys.argv[1:]]))
