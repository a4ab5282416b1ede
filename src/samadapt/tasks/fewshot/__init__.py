"""MedFocusCLIP (arXiv 2501.03839): SAM 2 masks as visual prompts for CLIP few-shot classification, with
zero-shot, linear-probe, CoOp, Tip-Adapter(-F) and fine-tuning baselines on the same splits.

Flow: `inputs` (plain / overlay / attention-focus inputs) -> `methods` (registry, fitting) -> `run` (one RUN
folder) -> `sweep` (methods x fractions x seeds); `cli` is what `samadapt train|sweep|predict` calls.
"""
