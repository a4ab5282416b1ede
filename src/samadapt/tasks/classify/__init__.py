"""Classification with a frozen SAM-family encoder: SLCA inside timm backbones, plus the baseline and linear-probe
methods, a label-efficiency sweep, prediction with attention overlays, and the demo.

Data flow: readers -> embedding store (SAM runs once per image) -> `prepare` -> `train.run_classification`
(shared `samadapt.training` loop) -> `outputs` (shared `samadapt.reports`). The CLI entry points are in `cli.py`.
"""
