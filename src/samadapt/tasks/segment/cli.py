"""`samadapt train|sweep|predict --task segment`: flags, and dispatch to train.py / sweep.py / predict.py."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from samadapt.errors import ConfigError


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", type=Path, help="ACDC folder (patientXXX/...) or a folder with images/ + labels/"
    )
    parser.add_argument("--encoder", default="sam_vit_b", help="encoder name (default sam_vit_b)")
    parser.add_argument(
        "--checkpoint", type=Path, default=None, help="official SAM / MedSAM / SAM 2 checkpoint"
    )
    parser.add_argument(
        "--encoder-arch", default=None, choices=["tiny"], help="tiny random encoder (tests/demo)"
    )
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--image-size", type=int, default=1024, help="encoder input size S (default 1024)")
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate (default 5e-4)")
    parser.add_argument("--patience", type=int, default=30, help="early-stopping patience on validation Dice")
    parser.add_argument("--aug-views", type=int, default=2, help="augmented views per training slice, cached")
    parser.add_argument(
        "--online-encoder", action="store_true", help="encode fresh augmentations every batch"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-names", type=_names, default=None, help="e.g. RV,MYO,LV (ACDC default)")
    parser.add_argument("--splits", type=Path, default=None, help="JSON {train, val, test} patient lists")
    parser.add_argument("--store", type=Path, default=None, help="embedding store (default $SAMADAPT_STORE or "
                        "~/.cache/samadapt/store)")  # fmt: skip
    parser.add_argument("--unet-channels", type=_int_tuple, default=(32, 64, 128, 256, 512))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--resume", action="store_true", help="continue interrupted trainings from their last finished epoch"
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser)
    parser.add_argument("--head", required=True, choices=["autosam", "cnn", "linear", "unet"])
    parser.add_argument(
        "--train-volumes", type=int, default=None, help="training patients to use (default all)"
    )
    parser.add_argument("--out", type=Path, required=True, help="run folder")


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse flag values that would only fail deep inside torch (Adam with lr nan, a DataLoader of batch 0)."""
    from samadapt.training.config import require

    require("--lr", args.lr, above=0)
    for flag, value, least in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 1),
                               ("--patience", args.patience, 1), ("--aug-views", args.aug_views, 0)):  # fmt: skip
        require(flag, value, at_least=least)
    channels = tuple(args.unet_channels)
    if len(channels) < 2 or min(channels) < 1:
        raise ConfigError(
            f"--unet-channels needs at least 2 positive channel counts (one per U-Net level, e.g. 32,64), "
            f"got {','.join(map(str, channels))}"
        )


def _train_kwargs(args: argparse.Namespace) -> dict:
    if args.data is None:
        raise ConfigError("--data DIR is required")
    _check_numbers(args)
    return {
        "data": args.data, "encoder": args.encoder, "checkpoint": args.checkpoint, "encoder_arch": args.encoder_arch,
        "precision": args.precision, "image_size": args.image_size, "epochs": args.epochs,
        "batch_size": args.batch_size, "lr": args.lr, "patience": args.patience, "aug_views": args.aug_views,
        "online_encoder": args.online_encoder, "seed": args.seed, "label_names": args.label_names,
        "splits_file": args.splits, "store": args.store, "unet_channels": tuple(args.unet_channels),
        "progress": not args.no_progress, "resume": bool(args.resume),
    }  # fmt: skip


def train(args: argparse.Namespace) -> int:
    from samadapt.tasks.segment.train import run_segmentation
    from samadapt.training.progress import close_bars_on_error

    with close_bars_on_error():
        metrics = run_segmentation(
            head=args.head, train_volumes=args.train_volumes, out=args.out, **_train_kwargs(args)
        )
    print(json.dumps({"test": metrics["test"], "run": str(args.out)}, indent=2))
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML (task: segment) with the flags below (optional)"
    )
    _add_common(parser)
    parser.add_argument("--heads", type=_names, default=["autosam", "cnn", "linear", "unet"])
    parser.add_argument("--train-volumes", type=_names, default=["1", "2", "5", "all"], help="e.g. 1,2,5,all")
    parser.add_argument(
        "--seeds", type=_int_tuple, default=(0,), help="split/initialisation seeds, e.g. 0,1,2"
    )
    parser.add_argument("--out", type=Path, default=None, help="sweep folder")


def sweep(args: argparse.Namespace) -> int:
    from samadapt.tasks.segment.sweep import run_sweep
    from samadapt.training.config import merge_config

    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    parser.add_argument("--task")
    parser.add_argument("--debug", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = merge_config(parser, args)
    if args.out is None:
        raise ConfigError(f"{args.config}: say where the sweep goes with `out:` or --out")
    kwargs = _train_kwargs(args)
    run_sweep(out=args.out, heads=list(args.heads), train_volumes=[str(v) for v in args.train_volumes],
              seeds=list(args.seeds), **kwargs)  # fmt: skip
    return 0


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", type=Path, required=True, help="run folder written by `samadapt train`")
    parser.add_argument("--input", type=Path, required=True, help="VOLUME.nii.gz")
    parser.add_argument("--out", type=Path, required=True, help="MASK.nii.gz (input's shape and affine)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="encoder checkpoint, if it moved")


def predict(args: argparse.Namespace) -> int:
    from samadapt.tasks.segment.predict import predict_file

    path = predict_file(args.run, args.input, args.out, checkpoint=args.checkpoint)
    print(f"wrote {path}")
    return 0
