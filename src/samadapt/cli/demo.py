"""`samadapt demo` (`make demo`): the three methods end to end on generated data, no downloads.

Without --checkpoint it uses a tiny random-weight configuration of the encoder (said loudly): the numbers show the
pipeline works and what its outputs look like, not what a real SAM checkpoint achieves.
"""

from __future__ import annotations

import argparse
import time
import warnings


def run(args: argparse.Namespace) -> int:
    from samadapt.encoders import RandomWeightsWarning
    from samadapt.tasks.classify.demo import run_demo as classify_demo
    from samadapt.tasks.fewshot.demo import run_demo as fewshot_demo
    from samadapt.tasks.segment.demo import run_demo as segment_demo

    out = args.out.resolve()
    weights = (
        str(args.checkpoint)
        if args.checkpoint
        else f"tiny random-weight {args.encoder} (no checkpoint given)"
    )
    print(f"samadapt demo: results go to {out}")
    print(f"samadapt demo: encoder weights: {weights}")
    started = time.perf_counter()
    reports = {}
    with warnings.catch_warnings():
        if args.checkpoint is None:  # said once above instead of once per run
            warnings.simplefilter("ignore", RandomWeightsWarning)
        print("samadapt demo [1/3] classification: SLCA vs baseline vs linear probe at two label fractions")
        reports["classification (SLCA) sweep"] = classify_demo(
            out / "classify", quick=args.quick, encoder=args.encoder, checkpoint=args.checkpoint
        )
        print("samadapt demo [2/3] segmentation: AutoSAM and linear heads vs U-Net on ACDC-like volumes")
        reports["segmentation sweep table"] = segment_demo(
            out / "segment", quick=args.quick, encoder=args.encoder, checkpoint=args.checkpoint
        )
        print("samadapt demo [3/3] few-shot: MedFocusCLIP vs CLIP baselines (tiny random CLIP and SAM 2)")
        reports["few-shot (MedFocusCLIP) sweep"] = fewshot_demo(out / "fewshot", quick=args.quick)
    minutes = (time.perf_counter() - started) / 60
    print(f"samadapt demo: done in {minutes:.1f} min")
    for what, path in reports.items():
        print(f"samadapt demo: {what}: {path}")
    print(
        f"samadapt demo: SAM-family weights used: {weights}; CLIP and SAM 2 for few-shot: tiny random weights"
    )
    return 0
