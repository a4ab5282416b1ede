"""What `samadapt export` writes for a few-shot run: the CLIP image tower with the method's head (images, and for
medfocus-attn the mask focus on the patch grid -> class probabilities). SAM 2's automatic masks are not part of
the graph: medfocus's overlays and medfocus-attn's focus grids are made as `samadapt predict` makes them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from samadapt.engine.export import ExportItem, Probabilities, Probabilities2


def export_items(cfg: Any, recorded: dict[str, Any], *, run: Path, clip_checkpoint: str | None) -> tuple:
    from samadapt.encoders.clip import load_clip
    from samadapt.tasks.fewshot.heads import load_learned_state
    from samadapt.tasks.fewshot.methods import build_model, get_method
    from samadapt.training.weights import load_weights

    class_names = [str(c) for c in recorded.get("class_names") or []]
    quick_gelu = (recorded.get("clip_identity") or {}).get("quick_gelu")
    clip = load_clip(cfg.clip, clip_checkpoint, quick_gelu=quick_gelu, device="cpu")
    state = load_weights(run / "model.safetensors")
    model = build_model(cfg.method, clip, class_names, cfg.options, state=state)
    load_learned_state(model, state, source=str(run / "model.safetensors"))
    model.eval()
    spec = get_method(cfg.method)
    size = clip.image_size
    example: tuple[torch.Tensor, ...] = (torch.zeros(2, 3, size, size),)
    names = ["images"]
    inputs = {
        "images": f"[B, 3, {size}, {size}]: CLIP's preprocessing of the image"
        + (
            " with the SAM 2 mask overlay painted on it (samadapt's overlay)"
            if spec.input == "overlay"
            else ""
        )
    }
    if spec.input == "attn":
        cells = clip.patch_grid * clip.patch_grid
        example += (torch.ones(2, cells),)
        names.append("focus")
        inputs["focus"] = (
            f"[B, {cells}]: the chosen SAM 2 mask averaged over CLIP's {clip.patch_grid}^2 patch grid"
        )
    wrapper = Probabilities2(model) if spec.input == "attn" else Probabilities(model)
    item = ExportItem(name="model", module=wrapper, example_inputs=example, input_names=names,
                      output_names=["probabilities"], dynamic_axes={n: {0: "batch"} for n in names}, inputs=inputs)  # fmt: skip
    glue = {"class_names": class_names, "clip": cfg.clip, "preprocess": clip.preprocess_cfg,
            "masks": "not exported: SAM 2 automatic masks come from samadapt's masker" if spec.input != "plain" else None}  # fmt: skip
    return [item], glue
