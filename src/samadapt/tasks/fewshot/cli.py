"""`samadapt train|sweep|predict` for `--task fewshot` (the lead's CLI dispatches here).

    samadapt train --task fewshot --data DATA --method medfocus --clip ViT-B-16 --clip-checkpoint FILE \
        --masker sam2_hiera_t --masker-checkpoint FILE --data-fraction 0.1 [--seed S] --out RUN
    samadapt sweep --config CFG          # YAML: task: fewshot, methods, data-fraction: 0.05,0.1,..., seeds
    samadapt predict --run RUN --images IMG_OR_DIR ... --out DIR

`train` given several methods, fractions or seeds (comma lists) runs the sweep into OUT.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from samadapt.errors import ConfigError
from samadapt.training.config import merge_config

log = logging.getLogger(__name__)

DEFAULT_FRACTIONS = "0.05,0.1,0.2,0.5,1.0"


def _bool_or_none(value: str) -> bool | None:
    table = {"auto": None, "true": True, "on": True, "yes": True, "false": False, "off": False, "no": False}
    if str(value).lower() not in table:
        raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")
    return table[str(value).lower()]


def _on_off(value: str) -> bool:
    flag = _bool_or_none(value)
    if flag is None:
        raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")
    return flag


def _add_common(parser: argparse.ArgumentParser, *, sweep: bool) -> None:
    from samadapt.tasks.fewshot.methods import METHODS, FewShotOptions
    from samadapt.tasks.fewshot.overlay import OverlayStyle

    d, o = FewShotOptions(), OverlayStyle()
    if not any(a.dest == "config" for a in parser._actions):
        parser.add_argument(
            "--config", type=Path, default=None, help="YAML file with the same keys as the flags"
        )
    parser.add_argument(
        "--data", default=None, help="dataset: image folder, MedMNIST .npz, CSV manifest, ISIC"
    )
    if sweep:
        parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods")
        parser.add_argument(
            "--data-fraction",
            "--data-fractions",
            dest="data_fraction",
            default=DEFAULT_FRACTIONS,
            help=f"comma-separated fractions of the training labels (default {DEFAULT_FRACTIONS})",
        )
        parser.add_argument(
            "--seeds", default="1", help="N for seeds 0..N-1, or a comma list like 0,3 (default 1)"
        )
    else:
        parser.add_argument(
            "--method", default="medfocus", help=f"one of {', '.join(METHODS)} (or a comma list)"
        )
        parser.add_argument(
            "--data-fraction",
            dest="data_fraction",
            default="1.0",
            help="fraction of the training labels, e.g. 0.05 (or a comma list for a sweep)",
        )
        parser.add_argument("--seed", default="0", help="seed (or a comma list for a sweep)")
    parser.add_argument("--out", default=None, help="output folder (RUN)")
    parser.add_argument(
        "--clip", default="ViT-B-16", help="open_clip config name, or an open_clip model config JSON"
    )
    parser.add_argument(
        "--clip-checkpoint", default=None, help="local CLIP weights (open_clip or OpenAI format)"
    )
    parser.add_argument(
        "--quick-gelu",
        type=_bool_or_none,
        default=None,
        metavar="{auto,on,off}",
        help="QuickGELU activation (default auto: on for OpenAI weights and -quickgelu configs)",
    )
    parser.add_argument("--masker", default="sam2_hiera_t", help="SAM 2 registry name for automatic masks")
    parser.add_argument(
        "--masker-checkpoint", default=None, help="SAM 2 checkpoint (official {'model': ...} file)"
    )
    parser.add_argument(
        "--masker-arch", default=None, help="'tiny' for the registry's tiny SAM 2 (tests/demo)"
    )
    parser.add_argument("--masker-image-size", type=int, default=None, help="SAM 2 input size (default 1024)")
    parser.add_argument("--points-per-side", type=int, default=32, help="automatic mask grid (default 32)")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.8)
    parser.add_argument("--stability-score-thresh", type=float, default=0.95)
    parser.add_argument("--mask-cache", default=None, help="mask cache folder (default OUT/mask_cache)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of filled-in val/test splits")
    parser.add_argument("--class-names", default=None, help="comma-separated class names for the prompts")
    parser.add_argument("--prompt-template", default=d.prompt_template, help="prompt with {class}")
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr, help="image-tower fine-tuning learning rate")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--patience", type=int, default=d.patience)
    parser.add_argument("--monitor", default=d.monitor, help="validation metric for early stopping")
    parser.add_argument(
        "--trainable-blocks",
        type=int,
        default=d.trainable_blocks,
        help="-1: fine-tune the whole CLIP image tower; k: only its last k blocks",
    )
    parser.add_argument("--coop-n-ctx", type=int, default=d.coop_n_ctx)
    parser.add_argument("--coop-epochs", type=int, default=d.coop_epochs)
    parser.add_argument("--coop-lr", type=float, default=d.coop_lr)
    parser.add_argument(
        "--coop-optimizer",
        default=d.coop_optimizer,
        choices=("sgd", "adamw"),
        help="sgd: CoOp's recipe (momentum 0.9, wd 5e-4, 1 warmup epoch at 1e-5); adamw: no warmup",
    )
    parser.add_argument("--tip-alpha", type=float, default=d.tip_alpha)
    parser.add_argument("--tip-beta", type=float, default=d.tip_beta)
    parser.add_argument("--tip-epochs", type=int, default=d.tip_epochs)
    parser.add_argument("--tip-lr", type=float, default=d.tip_lr)
    parser.add_argument(
        "--attn-strength", type=float, default=d.attn_strength, help="medfocus-attn bias strength"
    )
    parser.add_argument("--attn-layers", default=None, help="comma-separated block indices (default: all)")
    parser.add_argument("--attn-rows", default=d.attn_rows, choices=("cls", "all"))
    parser.add_argument(
        "--max-area-fraction",
        type=float,
        default=d.max_area_fraction,
        help="masks covering more of the image are background for medfocus-attn",
    )
    parser.add_argument(
        "--overlay-palette", default=o.palette, help="matplotlib colormap or comma-separated colours"
    )
    parser.add_argument("--overlay-alpha", type=float, default=o.alpha)
    parser.add_argument("--overlay-outline", type=_on_off, default=o.outline, metavar="{on,off}")
    parser.add_argument("--overlay-outline-color", default=o.outline_color)
    parser.add_argument("--overlay-outline-width", type=int, default=o.outline_width)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted training in --out from its last finished epoch",
    )


_KINDS = {int: "integers", float: "numbers", str: "names"}


def _csv(value, cast, flag: str) -> list:
    """A comma list (`0.1,0.5`) cast item by item; a bad item is a ConfigError naming `flag` and the value."""
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ConfigError(
            f"{flag} {value!r}: expected {_KINDS.get(cast, 'values')} separated by commas"
        ) from None


def _check_fractions(fractions: list[float]) -> list[float]:
    if not fractions:
        raise ConfigError("--data-fraction: give at least one fraction in (0, 1], e.g. 0.1")
    for f in fractions:
        if not 0 < f <= 1:  # NaN fails too
            raise ConfigError(f"--data-fraction {f:g}: fractions must be in (0, 1]")
    return fractions


def _check_seeds(seeds: list[int], flag: str) -> list[int]:
    if not seeds:
        raise ConfigError(f"{flag}: give at least one seed")
    for s in seeds:
        if s < 0:
            raise ConfigError(f"{flag} {s}: seeds must be >= 0")
    return seeds


def _check_numbers(args: argparse.Namespace) -> None:
    """Values argparse's types let through but training cannot use: one line naming the flag, before anything
    loads (a sweep would otherwise fail after its first runs)."""
    at_least = {"points_per_side": 1, "batch_size": 1, "epochs": 1, "coop_epochs": 1, "tip_epochs": 1,
                "coop_n_ctx": 1, "patience": 0, "split_seed": 0, "overlay_outline_width": 0}  # fmt: skip
    from samadapt.training.config import require

    def flag(key: str) -> str:
        return f"--{key.replace('_', '-')}"

    for key, low in at_least.items():
        require(flag(key), getattr(args, key), at_least=low)
    if args.masker_image_size is not None:
        require("--masker-image-size", args.masker_image_size, at_least=1)
    for key in ("lr", "coop_lr", "tip_lr"):
        require(flag(key), getattr(args, key), above=0)
    require("--weight-decay", args.weight_decay, at_least=0)
    for key in ("tip_alpha", "tip_beta", "attn_strength"):
        require(flag(key), getattr(args, key))
    for key in ("overlay_alpha", "max_area_fraction", "pred_iou_thresh", "stability_score_thresh"):
        require(flag(key), getattr(args, key), at_least=0, at_most=1)


def config_from_args(args: argparse.Namespace):
    from samadapt.encoders.masks import MaskerSettings
    from samadapt.tasks.fewshot.methods import FewShotOptions
    from samadapt.tasks.fewshot.overlay import OverlayStyle
    from samadapt.tasks.fewshot.run import FewShotConfig

    _check_numbers(args)
    attn_layers = _csv(args.attn_layers, int, "--attn-layers") if args.attn_layers else None
    class_names = _csv(args.class_names, str, "--class-names") if args.class_names else None
    options = FewShotOptions(
        prompt_template=args.prompt_template, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
        batch_size=args.batch_size, patience=args.patience, monitor=args.monitor,
        trainable_blocks=args.trainable_blocks, coop_n_ctx=args.coop_n_ctx, coop_epochs=args.coop_epochs,
        coop_lr=args.coop_lr, coop_optimizer=args.coop_optimizer, tip_alpha=args.tip_alpha,
        tip_beta=args.tip_beta, tip_epochs=args.tip_epochs, tip_lr=args.tip_lr, attn_strength=args.attn_strength,
        attn_layers=attn_layers, attn_rows=args.attn_rows,
        max_area_fraction=args.max_area_fraction,
        overlay=OverlayStyle(palette=args.overlay_palette, alpha=args.overlay_alpha,
                             outline=bool(args.overlay_outline), outline_color=args.overlay_outline_color,
                             outline_width=args.overlay_outline_width),
        progress=not args.no_progress,
    )  # fmt: skip
    settings = MaskerSettings(
        points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_score_thresh,
    )  # fmt: skip
    return FewShotConfig(
        data=args.data, clip=args.clip, clip_checkpoint=args.clip_checkpoint, quick_gelu=args.quick_gelu,
        masker=args.masker, masker_checkpoint=args.masker_checkpoint, masker_arch=args.masker_arch,
        masker_image_size=args.masker_image_size, masker_settings=settings, mask_cache=args.mask_cache,
        split_seed=args.split_seed, class_names=class_names,
        out=args.out, device=args.device, options=options,
    )  # fmt: skip


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, sweep=False)


def train(args: argparse.Namespace) -> int:
    from samadapt.tasks.fewshot.run import load_resources, run_fewshot, with_method

    args = _merge(args, add_train_arguments)
    cfg, methods, fractions, seeds = train_plan(args)
    resume = bool(args.resume)
    if len(methods) * len(fractions) * len(seeds) > 1:
        return _sweep(cfg, methods=methods, fractions=fractions, seeds=seeds, resume=resume)
    out = Path(cfg.out)
    res = load_resources(cfg, methods=methods, out=out)
    metrics = run_fewshot(
        with_method(cfg, method=methods[0], fraction=fractions[0], seed=seeds[0], out=out),
        res,
        out,
        resume=resume,
    )
    test = metrics["test"]
    print(
        f"{methods[0]}: test accuracy {test['accuracy']:.4f}, AUC {test['auc']:.4f}, balanced accuracy "
        f"{test['balanced_accuracy']:.4f} (n_train {metrics['n_train']}) -> {out}"
    )
    return 0


def train_plan(args: argparse.Namespace):
    """(config, methods, fractions, seeds) of `train`, every value checked before anything loads."""
    cfg = config_from_args(args)
    if not cfg.out:
        raise ConfigError("--out RUN is required")
    methods = _methods(args.method, "--method")
    fractions = _check_fractions(_csv(args.data_fraction, float, "--data-fraction"))
    seeds = _check_seeds(_csv(args.seed, int, "--seed"), "--seed")
    return cfg, methods, fractions, seeds


def add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, sweep=True)


def sweep(args: argparse.Namespace) -> int:
    args = _merge(args, add_sweep_arguments)
    cfg = config_from_args(args)
    if not cfg.out:
        raise ConfigError("--out DIR is required")
    seeds = str(args.seeds).strip()
    seed_list = list(range(int(seeds))) if seeds.isdigit() else _csv(seeds, int, "--seeds")
    if not seed_list:
        raise ConfigError(f"--seeds {seeds!r}: give N >= 1 (seeds 0..N-1) or a comma list")
    return _sweep(
        cfg, methods=_methods(args.methods, "--methods"), seeds=_check_seeds(seed_list, "--seeds"),
        fractions=_check_fractions(_csv(args.data_fraction, float, "--data-fraction")), resume=bool(args.resume),
    )  # fmt: skip


def _methods(value, flag: str) -> list[str]:
    from samadapt.tasks.fewshot.methods import get_method

    methods = _csv(value, str, flag)
    if not methods:
        raise ConfigError(f"{flag}: give at least one method")
    for method in methods:
        get_method(method)  # unknown names fail before anything loads
    return methods


def _sweep(cfg, *, methods: list[str], fractions: list[float], seeds: list[int], resume: bool = False) -> int:
    from samadapt.tasks.fewshot.sweep import run_sweep

    report = run_sweep(
        cfg, methods=methods, fractions=fractions, seeds=seeds, out=Path(cfg.out), resume=resume
    )
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
    parser.add_argument("--clip-checkpoint", default=None, help="CLIP weights, if moved since training")
    parser.add_argument("--masker-checkpoint", default=None, help="SAM 2 weights, if moved since training")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def predict(args: argparse.Namespace) -> int:
    from samadapt.tasks.fewshot.predict import predict_images

    path = predict_images(
        run=Path(args.run), images=list(args.images), out=Path(args.out), clip_checkpoint=args.clip_checkpoint,
        masker_checkpoint=args.masker_checkpoint, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    print(f"predictions: {path}")
    return 0


def _merge(args: argparse.Namespace, add_arguments) -> argparse.Namespace:
    """Apply `--config FILE` (YAML, same keys as the flags) under the flags given on the command line."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task", default=None)
    add_arguments(parser)
    args = merge_config(parser, args)
    for key in ("data_fraction", "methods", "seeds", "seed", "method", "class_names", "attn_layers"):
        value = getattr(args, key, None)
        if isinstance(value, list):  # YAML lists -> the comma form the flags use
            setattr(args, key, ",".join(str(v) for v in value))
    return args
