"""TensorBoard backend: event files under ``OUT/tensorboard/RUN_NAME`` (``tensorboard --logdir OUT/tensorboard``).

What each call writes (``torch.utils.tensorboard.SummaryWriter``):
- ``log_params``: one text summary ``params`` (a Markdown table of the flattened params; TensorBoard files text
  under the tag ``params/text_summary``, as it does every text tag below).
- ``log_metrics``: one scalar per metric at ``step`` (step 0 when None).
- ``log_artifact``: a PNG becomes an image summary ``artifacts/<file name>``; any other file (HTML, CSV, JSON,
  weights) is listed as a text summary ``artifacts/<file name>`` holding its path and size, not copied; a folder
  logs each file in it the same way.
- ``close``: a text summary ``status`` (FINISHED / FAILED / KILLED), then the file is flushed and closed.
- ``child(name)``: a writer in ``OUT/tensorboard/RUN_NAME/name``, shown as its own run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from samadapt.tracking.base import Tracker


class TensorBoardTracker(Tracker):
    kind = "tensorboard"

    def __init__(self, *, out: Path, run_name: str, experiment: str, log_dir: Path | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(run_name=run_name, experiment=experiment)
        self.log_dir = Path(log_dir) if log_dir is not None else Path(out) / "tensorboard" / run_name
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    @property
    def run_id(self) -> str:
        return str(self.log_dir)

    def _log_params(self, params: dict[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v.replace('|', '&#124;')} |" for k, v in params.items())
        self.writer.add_text("params", f"| param | value |\n|---|---|\n{rows}")

    def _log_metrics(self, metrics: dict[str, float], *, step: int | None) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=int(step or 0))

    def _log_artifact(self, path: Path) -> None:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            tag = f"artifacts/{file.relative_to(path.parent).as_posix()}"
            if file.suffix.lower() == ".png":
                from PIL import Image

                with Image.open(file) as image:
                    pixels = np.asarray(image.convert("RGB"))
                self.writer.add_image(tag, pixels, dataformats="HWC")
            else:
                self.writer.add_text(tag, f"{file.resolve()} ({file.stat().st_size} bytes)")

    def child(self, run_name: str) -> TensorBoardTracker:
        return TensorBoardTracker(
            out=self.log_dir, run_name=run_name, experiment=self.experiment, log_dir=self.log_dir / run_name
        )

    def _close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()
