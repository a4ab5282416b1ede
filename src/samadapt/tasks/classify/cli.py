"""`samadapt train|sweep|predict` for `--task classify` (the lead's CLI dispatches here)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from samadapt.errors import ConfigError
from samadapt.tasks.classify.config import ClassifyConfig, add_config_arguments, config_from_args
from samadapt.training.config import merge_config

log = logging.getLogger(__name__)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument(
            "--config", type=Path, default=None, help="YAML file with the same keys as the flags"
        )
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted training in --out from its last epoch"
    )


def train(args: argparse.Namespace) -> int:
    """One run: prepare data and embeddings, train, evaluate, write RUN. Works under torchrun (DDP)."""
    from samadapt.tasks.classify.prepare import prepare
    from samadapt.tasks.classify.train import run_classification
    from samadapt.training import cleanup_distributed, init_distributed
    from samadapt.training.progress import close_bars_on_error

    args = _merge(args, add_train_arguments)
    cfg = config_from_args(args).validate()
    if not cfg.out:
        raise ConfigError("--out RUN is required")
    ctx = init_distributed(device=cfg.device)
    progress = ctx.is_main and not args.no_progress
    try:
        with close_bars_on_error():
            prepared = prepare(cfg, need_sam=cfg.method != "baseline", progress=progress)
            metrics = run_classification(
                cfg, prepared, Path(cfg.out), ctx=ctx, progress=progress, resume=bool(args.resume)
            )
    finally:
        cleanup_distributed(ctx)
    if ctx.is_main:
        test = metrics["test"]
        print(
            f"{cfg.method}: test accuracy {test['accuracy']:.4f}, AUC {test['auc']:.4f}, "
            f"balanced accuracy {test['balanced_accuracy']:.4f} (n_train {metrics['n_train']}) -> {cfg.out}"
        )
    return 0


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument(
            "--config", type=Path, default=None, help="YAML with `task: classify` and run settings"
        )
    add_config_arguments(parser, skip=("method", "label_fraction", "seed"))
    parser.add_argument("--methods", default="slca,baseline,linear-probe", help="comma-separated methods")
    parser.add_argument("--label-fractions", dest="label_fractions", default="0.01,0.05,0.1,0.25,1.0")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def sweep(args: argparse.Namespace) -> int:
    from samadapt.tasks.classify.sweep import run_sweep

    args = _merge(args, add_sweep_arguments)
    methods = [str(m).strip() for m in _as_list(args.methods) if str(m).strip()]
    try:
        fractions = [float(f) for f in _as_list(args.label_fractions) if str(f).strip()]
    except ValueError:
        raise ConfigError(
            f"--label-fractions {args.label_fractions!r}: expected numbers like 0.1,0.5,1.0"
        ) from None
    base = config_from_args(args, method=methods[0] if methods else "slca")
    if not base.out:
        raise ConfigError("--out DIR is required")
    report = run_sweep(base, methods=methods, fractions=fractions, seeds=int(args.seeds), out=Path(base.out),
                       progress=not args.no_progress)  # fmt: skip
    print(f"sweep report: {report}")
    return 0


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    if not any(a.dest == "run" for a in parser._actions):
        parser.add_argument(
            "--run", type=Path, required=True, help="a trained run folder (holds config.yaml)"
        )
    parser.add_argument("--images", nargs="+", required=True, help="image files or folders")
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder for predictions.csv and overlays"
    )
    parser.add_argument("--store", default=None, help="embedding store directory (default OUT/embeddings)")
    parser.add_argument("--device", default=None)
    if not any(a.dest == "no_progress" for a in parser._actions):
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def predict(args: argparse.Namespace) -> int:
    from samadapt.tasks.classify.predict import predict_images

    csv_path = predict_images(run=Path(args.run), images=list(args.images), out=Path(args.out), store=args.store,
                              device=args.device, progress=not args.no_progress)  # fmt: skip
    print(f"predictions: {csv_path}")
    return 0


def _as_list(value) -> list:
    """A comma-separated flag value, or a YAML list."""
    return list(value) if isinstance(value, list | tuple) else str(value).split(",")


def _merge(args: argparse.Namespace, add_arguments) -> argparse.Namespace:
    """Apply `--config FILE` (YAML, same keys as the flags) under the flags given on the command line."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--task", default=None)
    add_arguments(parser)
    return merge_config(parser, args)


__all__ = [
    "ClassifyConfig",
    "add_predict_arguments",
    "add_sweep_arguments",
    "add_train_arguments",
    "predict",
    "sweep",
    "train",
]
