"""`samadapt demo` (`make demo`): the main job end to end on generated data, no downloads.

Without --checkpoint it uses a tiny random-weight configuration of the encoder (said loudly): the numbers show the
pipeline works and how SLCA uses spatial attention, not what a real SAM checkpoint achieves.
"""

from __future__ import annotations

import argparse
import time
import warnings


def run(args: argparse.Namespace) -> int:
    from samadapt.encoders import RandomWeightsWarning
    from samadapt.tasks.classify.demo import run_demo

    out = args.out.resolve()
    weights = (
        str(args.checkpoint)
        if args.checkpoint
        else f"tiny random-weight {args.encoder} (no checkpoint given)"
    )
    print(f"samadapt demo: results go to {out}")
    print(f"samadapt demo: encoder weights: {weights}")
    started = time.perf_counter()
    with warnings.catch_warnings():
        if args.checkpoint is None:  # said once above instead of once per run
            warnings.simplefilter("ignore", RandomWeightsWarning)
        report = run_demo(
            out / "classify", quick=args.quick, encoder=args.encoder, checkpoint=args.checkpoint
        )
    minutes = (time.perf_counter() - started) / 60
    print(f"samadapt demo: done in {minutes:.1f} min")
    print(f"samadapt demo: classification sweep report: {report}")
    print(f"samadapt demo: weights used: {weights}")
    return 0
