"""A fast SAM 2 automatic mask generator with the official generator's arithmetic and output.

`sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator` decodes every grid point in batches of
`points_per_batch`, upsamples all 3 candidate masks of every point to the full image, and filters afterwards.
This generator computes the same arithmetic in another order:

1. the image encoder once (`SAM2ImagePredictor.set_image`, so the features are the official ones);
2. all point prompts through the official prompt encoder at once; then the official mask decoder's
   transformer on a thin representation of the per-prompt image tokens (`lowrank_decoder.ThinDecoder`: the
   same modules and weights, equal to the official output up to float rounding, several times cheaper because
   no prompt gets its own copy of the 64x64 image tokens), in chunks of `DECODE_CHUNK` prompts; the final
   attention runs for the IoU token and the mask tokens this setting returns, and only points with a candidate
   above `pred_iou_thresh` get their image tokens materialised and the official upscaling convolutions;
3. in the workers, per chunk: the IoU filter, then bounds of the official full-image stability score and the
   exact full-image boxes, from 2x2 blocks of the 256x256 logits, without upsampling
   (`upsampled_stats.stability_status`): each candidate is stable, unstable or undecided (no heuristic
   pre-filter: every decision is the official one);
4. box NMS (torchvision's `batched_nms`, predicted IoU as score, as the official code) over the stable and
   undecided candidates, settling exactly (`exactly_stable`) only the undecided ones NMS keeps, and rerunning
   without those that fail (`stable_nms`: the same kept masks as filtering everything first);
5. only the kept masks are upsampled to the image size.

`min_mask_region_area > 0`: the official generator hands it to `SAM2Transforms` as hole / sprinkle areas, filled
on the low-resolution logits through sam2's CUDA connected-components extension (on an install without
`sam2._C` the official code warns and skips it). Here the same rule runs on the CPU with scipy's 8-connected
labelling, so the setting takes effect everywhere.

Precision: "fp32" is the exact mode and the default; "bf16" runs the decoder under CPU/CUDA autocast (faster only
on recent GPUs; slower on every CPU we measured, AMX included); `resolve_precision("auto")` picks.
Crop layers (`crop_n_layers > 0`) and the m2m refinement are not implemented here: use the official generator.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.ops.boxes import batched_nms

from samadapt.encoders.lowrank_decoder import ThinDecoder
from samadapt.encoders.upsampled_stats import (
    UNDECIDED,
    UNSTABLE,
    exactly_stable,
    stability_status,
    upsample,
)
from samadapt.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
# Prompts per thin-keys decoder call: its intermediates are [chunk, 4096, 64] blocks, fastest while they stay in
# cache. On the CPU the chunks run on `decode_workers()` threads with one intra-op thread each: the decoder is
# many mid-sized ops, which two single-threaded workers overlap better than one two-threaded stream
# (2-core EPYC, ms per prompt: 2 x 1 threads 9.8 at chunk 4, 13.2 at 8; 1 x 2 threads 13.0 at 8, 19 at 16).
DECODE_CHUNK = 4
# Prompts per pass of the upscaling convolutions (see `_masks`).
MASK_CHUNK = 2
# Masks upsampled to the full image at once (memory: chunk * H * W floats).
UPSAMPLE_CHUNK = 32
# Candidates whose full-image stability and boxes are found at once for a 1024 x 1024 image (fewer for larger ones;
# memory: a few low-resolution sizes each, plus the undecided blocks' pixels).
STATS_CHUNK = 64


def decode_workers(device: torch.device, chunks: int) -> int:
    """Threads for the thin-keys decoder: one per intra-op thread on the CPU (at most 4), one on an accelerator."""
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), 4, chunks))


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether "auto" picks bf16 masks on `device`: CUDA with bf16 only. On the CPU bf16 (the encoder under
    autocast, one per-prompt product rounded, see `FastMaskGenerator._product_dtype`) gains little (2-core Zen 4,
    calibrated weights, official settings: ~14.9 vs ~16.4 s per 1024 image) and is not bit-exact (a borderline
    mask can drop out), so the CPU default stays fp32, the official masks. Autocast over the whole decoder was
    slower than fp32 there (AMX Xeon: decoding 19.6 vs 17.6 s; AVX512-BF16 without AMX: 21.3 vs 13.1 s)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return False


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """ "fp32" / "bf16" as given; "auto" is bf16 only where it is native, else fp32."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown masker precision {precision!r}; use one of auto, {', '.join(PRECISIONS)}")
    return precision


def point_grid(n_per_side: int) -> np.ndarray:
    """The official grid (`sam2.utils.amg.build_point_grid`): n x n cell centres in [0, 1], x fastest."""
    from sam2.utils.amg import build_point_grid

    return build_point_grid(n_per_side)


def fill_small_regions(logits: torch.Tensor, *, area: int, threshold: float) -> torch.Tensor:
    """`SAM2Transforms.postprocess_masks`' hole filling and sprinkle removal on [K, h, w] logits, on the CPU.

    Background components (logit <= threshold, 8-connected) of at most `area` pixels become threshold + 10, then
    foreground components of at most `area` pixels become threshold - 10, as the official CUDA path does.
    """
    from scipy import ndimage

    out = logits.float().cpu().numpy().copy()
    structure = np.ones((3, 3), bool)
    for k in range(out.shape[0]):
        for fg, value in ((False, threshold + 10.0), (True, threshold - 10.0)):
            region = out[k] > threshold if fg else out[k] <= threshold
            labels, n = ndimage.label(region, structure=structure)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel())
            small = (sizes <= area) & (np.arange(len(sizes)) > 0)
            out[k][small[labels]] = value
    return torch.from_numpy(out).to(logits.device)


@dataclass
class _Candidates:
    """Low-resolution candidates of one image: logits [K, 256, 256], predicted IoU [K] and, once the full-image
    stability bounds have run (`stability_status`), their full-image boxes [K, 4] and which are still undecided
    [K] bool."""

    logits: torch.Tensor
    iou: torch.Tensor
    counts: dict[str, int] = field(default_factory=dict)  # filter stages already applied: candidates left
    boxes: torch.Tensor | None = None
    undecided: torch.Tensor | None = None

    @classmethod
    def cat(cls, parts: list[_Candidates], *, side: int) -> _Candidates:
        counts = {k: sum(p.counts[k] for p in parts) for k in (parts[0].counts if parts else {})}
        if not parts:
            return cls(torch.zeros(0, side, side), torch.zeros(0))
        boxes = undecided = None
        if all(p.boxes is not None for p in parts):
            boxes = torch.cat([p.boxes for p in parts])
            undecided = torch.cat([p.undecided for p in parts])
        logits, iou = torch.cat([p.logits for p in parts]), torch.cat([p.iou for p in parts])
        return cls(logits, iou, counts, boxes, undecided)


class FastMaskGenerator:
    """`SAM2AutomaticMaskGenerator`'s masks for one image, the fast way (see the module docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        points_per_side: int = 32,
        pred_iou_thresh: float = 0.8,
        stability_score_thresh: float = 0.95,
        stability_score_offset: float = 1.0,
        mask_threshold: float = 0.0,
        box_nms_thresh: float = 0.7,
        crop_n_layers: int = 0,
        min_mask_region_area: int = 0,
        multimask_output: bool = True,
        batch_size: int = 64,
        precision: str = "fp32",
        image_size: int = 1024,
    ) -> None:
        from sam2.sam2_image_predictor import SAM2ImagePredictor

        if crop_n_layers != 0:
            raise ConfigError(
                f"the fast masker does not implement crop layers (crop_n_layers={crop_n_layers}); "
                "use implementation='official'"
            )
        if points_per_side < 1:
            raise ConfigError(f"points_per_side must be at least 1, got {points_per_side}")
        self.model = model
        self.points_per_side = points_per_side
        self.pred_iou_thresh = pred_iou_thresh
        self.stability_score_thresh = stability_score_thresh
        self.stability_score_offset = stability_score_offset
        self.mask_threshold = mask_threshold
        self.box_nms_thresh = box_nms_thresh
        self.min_mask_region_area = min_mask_region_area
        self.multimask_output = multimask_output
        # points_per_batch bounds the official generator's memory; the thin decoder's own chunk is DECODE_CHUNK
        self.batch_size = batch_size
        self.precision = resolve_precision(precision, _device(model))
        with warnings.catch_warnings():  # SAM2Transforms calls torch.jit.script, deprecated in torch 2.14
            warnings.simplefilter("ignore", FutureWarning)
            self.predictor = SAM2ImagePredictor(model)
        self.predictor._bb_feat_sizes = [(image_size // s, image_size // s) for s in (4, 8, 16)]
        # diagnostics of the last call: candidates after each stage
        self.last_counts: dict[str, int] = {}

    # -- decoding -----------------------------------------------------------------------------------------------

    def _autocast(self) -> Any:
        """The decoder under autocast: bf16 on an accelerator only (on the CPU see `_product_dtype`)."""
        if self.precision == "bf16" and _device(self.model).type != "cpu":
            return torch.autocast(_device(self.model).type, dtype=torch.bfloat16)
        return nullcontext()

    def _encoder_autocast(self) -> Any:
        """The image encoder under bf16 autocast in bf16 precision (a plain conv/matmul stack: 1.8x faster on
        a 2-core AVX-512 BF16 EPYC, max error 1.4 % of the features' range,
        `benchmarks/results/hiera_speed_epyc_zen4.json`)."""
        if self.precision == "bf16":
            return torch.autocast(_device(self.model).type, dtype=torch.bfloat16)
        return nullcontext()

    @property
    def _product_dtype(self) -> torch.dtype | None:
        """bf16 precision on the CPU: the per-prompt factor product of the upscaling's first convolution in bf16
        (~0.6 s less per 1024 image at the official settings on a 2-core Zen 4), everything else in fp32. Autocast
        over the whole decoder is slower there: its casts around the many mid-sized ops cost more than the
        products save; the second convolution's cost is writing its output, which bf16 does not shorten."""
        if self.precision == "bf16" and _device(self.model).type == "cpu":
            return torch.bfloat16
        return None

    def _outputs(self) -> slice:
        """Which of the decoder's mask outputs (and IoU predictions) this setting can return."""
        dec = self.model.sam_mask_decoder
        if self.multimask_output:
            return slice(1, None)
        if dec.dynamic_multimask_via_stability and not dec.training:
            return slice(0, None)  # the choice among all four depends on the masks
        return slice(0, 1)

    def _prompts(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(decoder tokens [P, T, C]: output tokens then the sparse prompt, dense embeddings [P, C, h, w]) of
        single-point prompts [P, 2] in model coordinates, as `MaskDecoder.predict_masks` assembles them."""
        model, dec = self.model, self.model.sam_mask_decoder
        labels = torch.ones(points.shape[0], 1, dtype=torch.int, device=points.device)
        sparse, dense = model.sam_prompt_encoder(points=(points[:, None, :], labels), boxes=None, masks=None)
        heads = [dec.iou_token.weight, dec.mask_tokens.weight]
        if dec.pred_obj_scores:
            heads.insert(0, dec.obj_score_token.weight)
        b = sparse.shape[0]
        tokens = torch.cat((torch.cat(heads, dim=0).unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        return tokens, dense

    def _decode_chunk(
        self, thin: ThinDecoder, tokens: torch.Tensor, *, size: tuple[int, int]
    ) -> tuple[_Candidates, int]:
        # grad mode and autocast are per thread: set them in the worker
        with torch.inference_mode():
            return self._decode(thin, tokens, size=size)

    def _decode(
        self, thin: ThinDecoder, tokens: torch.Tensor, *, size: tuple[int, int]
    ) -> tuple[_Candidates, int]:
        """The official `MaskDecoder.predict_masks` arithmetic for a chunk of prompts: the thin-keys transformer
        for all, the final attention over all tokens and the upscaling only for the points with a candidate
        above `pred_iou_thresh`."""
        dec = self.model.sam_mask_decoder
        s = 1 if dec.pred_obj_scores else 0
        # the mask outputs this setting can return, and the output tokens whose final attention is needed: the IoU
        # token's and theirs, for every prompt at once (with a trained checkpoint nearly every point passes the
        # IoU bar, so a separate pass for the IoU token would mostly be repeated)
        mask_ids = torch.arange(dec.num_mask_tokens)[self._outputs()]
        needed = torch.cat([torch.tensor([s]), s + 1 + mask_ids]).to(tokens.device)
        with self._autocast():
            state = thin(tokens)
            hs = thin.final(state, needed)  # [B, 1 + masks, C]: the IoU token, then the mask tokens
            iou = dec.iou_prediction_head(hs[:, 0, :]).float()
            if self.pred_iou_thresh > 0.0:
                keep = (iou[:, self._outputs()] > self.pred_iou_thresh).any(dim=1).nonzero().squeeze(1)
            else:
                keep = torch.arange(tokens.shape[0], device=tokens.device)
            if keep.numel() == 0:
                side = 4 * self.predictor._bb_feat_sizes[-1][0]
                empty = _Candidates(torch.zeros(0, side, side), torch.zeros(0))
                return self._prefilter(empty, size=size), 0
            masks = self._masks(thin, state, keep, hs=hs[keep, 1:], mask_ids=mask_ids)
            iou = iou[keep]
        # `masks` holds the outputs `mask_ids` only
        if self.multimask_output:
            iou = iou[:, 1:]
        elif dec.dynamic_multimask_via_stability and not dec.training:
            masks, iou = dec._dynamic_multimask_via_stability(masks, iou)
        else:
            iou = iou[:, 0:1]
        cand = _Candidates(masks.flatten(0, 1), iou.flatten(0, 1))
        return self._prefilter(cand, size=size), len(keep)

    def _prefilter(self, cand: _Candidates, *, size: tuple[int, int]) -> _Candidates:
        """The IoU filter, and the full-image stability bounds and boxes
        (`stability_status`) on one chunk's candidates, in the worker while its logits are in cache: the filters'
        many element-wise passes run on a few candidates at once on each worker's core instead of on large
        batches afterwards (2-core AMX Xeon: 1.9 ms per candidate against 3.5 ms). Not with
        `min_mask_region_area`: the official code fills small regions before the stability score."""
        if self.min_mask_region_area > 0:
            return cand
        logits, iou = cand.logits, cand.iou
        if self.pred_iou_thresh > 0.0:
            keep = iou > self.pred_iou_thresh
            logits, iou = logits[keep], iou[keep]
        counts = {"after_iou": len(iou)}
        status, boxes = self._stability_status(logits, size=size, subpixel=True)
        alive = status != UNSTABLE
        counts["after_stability_bounds"] = int(alive.sum())
        counts["stability_undecided"] = int((status == UNDECIDED).sum())
        return _Candidates(logits[alive], iou[alive], counts, boxes[alive], (status == UNDECIDED)[alive])

    def _stability_status(
        self, logits: torch.Tensor, *, size: tuple[int, int], subpixel: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(status [K] int8, full-image boxes [K, 4]) of low-resolution candidates: the official full-image
        stability filter as far as pixel-count bounds decide it, and `batched_mask_to_box`, from the
        low-resolution logits (`stability_status`: only the pixels near the threshold that can change a box
        are upsampled)."""
        kept, boxes = [], []
        # fewer candidates at once for larger images: an undecided block holds (H / 256) x (W / 256) pixels
        stats_chunk = max(1, STATS_CHUNK * 1024 * 1024 // (size[0] * size[1]))
        for start in range(0, len(logits), stats_chunk):
            chunk = logits[start : start + stats_chunk]
            k, b = stability_status(
                _spatial(chunk) if subpixel else chunk,
                size,
                threshold=self.mask_threshold,
                offset=self.stability_score_offset,
                stability_thresh=self.stability_score_thresh,
            )
            kept.append(k)
            boxes.append(b)
        if not kept:
            return torch.zeros(0, dtype=torch.int8), torch.zeros(0, 4, dtype=torch.int64)
        return torch.cat(kept), torch.cat(boxes)

    def _nms(
        self,
        cand: _Candidates,
        *,
        size: tuple[int, int],
        subpixel: bool,
        counts: dict[str, int],
    ) -> torch.Tensor:
        """Indices of the candidates the official generator keeps, in NMS order (`stable_nms`)."""

        def exact(idx: torch.Tensor) -> torch.Tensor:
            chunk = cand.logits[idx]
            return exactly_stable(
                _spatial(chunk) if subpixel else chunk,
                size,
                threshold=self.mask_threshold,
                offset=self.stability_score_offset,
                stability_thresh=self.stability_score_thresh,
            )

        keep, settled, failed = stable_nms(
            cand.iou, cand.boxes, cand.undecided, exact=exact, nms_thresh=self.box_nms_thresh
        )
        counts["stability_decided_exactly"] = settled
        counts["stability_failed_exactly"] = failed
        return keep

    def _masks(
        self, thin: ThinDecoder, state: Any, keep: torch.Tensor, *, hs: torch.Tensor, mask_ids: torch.Tensor
    ) -> torch.Tensor:
        """Low-resolution logits [b, len(mask_ids), 4h, 4w] of the prompts `keep`, given their mask tokens'
        final-attention outputs `hs` [b, len(mask_ids), C]: the official `output_upscaling` and hypernetwork
        arithmetic. Each 2x2 stride-2 transposed convolution is a per-pixel
        matrix product; the first runs on the thin keys' factors, so the 64x64x256 image tokens of a prompt are
        never built. Everything stays in sub-pixel order (pixel (4y + 2i + k, 4x + 2j + l) at row (y, x, i, j),
        column (k, l, c)), with the high-resolution features brought into that order once per image, so only
        the 4-channel logits are reordered at the end."""
        dec, feats = self.model.sam_mask_decoder, self.predictor._features
        dc1, ln1, act1, dc2, act2 = dec.output_upscaling
        h, w = feats["image_embed"].shape[2:]
        c1, c2 = dc1.weight.shape[1], dc2.weight.shape[1]
        # once per image: the thin keys' memo is keyed by tensor identity, so a fresh w1 per chunk would redo
        # (and keep alive) the shared [N, C] @ w1.T product for every chunk
        w1, w2 = thin.memo.get("subpixel_weights", dc1.weight, dc2.weight, compute=_subpixel_weights)
        add1, add2 = self._subpixel_features(thin, h=h, w=w)
        hyper_mlps = [dec.output_hypernetworks_mlps[int(i)] for i in mask_ids]
        masks = []
        # a few prompts at a time: their [b, 16384, 128] intermediates stay below glibc's mmap threshold (32 MiB),
        # so they reuse freed heap memory instead of faulting in fresh pages on every call
        low = self._product_dtype
        for start in range(0, len(keep), MASK_CHUNK):
            idx = keep[start : start + MASK_CHUNK]
            b = len(idx)
            up = thin.image_tokens(state, idx, weight=w1, bias=add1, product_dtype=low)
            up = _gelu_(act1, F.layer_norm(up.view(b, h * w * 4, c1), (c1,), ln1.weight, ln1.bias, ln1.eps))
            # + add2 inside the matrix product (one pass less over the largest intermediate); fp32 in every
            # precision: its cost is writing the [b, 16384, 128] output, which bf16 does not shorten
            bias = add2.view(1, h * w * 4, 4 * c2).expand(b, -1, -1)
            up = _gelu_(act2, torch.baddbmm(bias, up, w2.T.expand(b, -1, -1))).view(b, -1, c2)
            tok = hs[start : start + MASK_CHUNK]
            hyper = torch.stack([mlp(tok[:, i, :]) for i, mlp in enumerate(hyper_mlps)], 1)  # [b, m, c2]
            # [b, masks, (y, x, i, j, k, l)]: left in sub-pixel order, shaped [b, masks, 4h, 4w]; the stability
            # score does not depend on pixel order, so only the candidates that get past it are reordered
            masks.append(torch.einsum("bpc,bmc->bmp", up, hyper).reshape(b, -1, 4 * h, 4 * w))
        return torch.cat(masks).float()

    def _subpixel_features(self, thin: ThinDecoder, *, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What the two transposed convolutions' outputs get added before their activations, in sub-pixel order,
        once per image: (bias1 + high-res features at stride 8) [h*w, (i, j, c1)] and (bias2 + features at
        stride 4) [h*w, (i, j), (k, l, c2)]."""
        dec, feats = self.model.sam_mask_decoder, self.predictor._features
        dc1, _, _, dc2, _ = dec.output_upscaling
        c1, c2 = dc1.weight.shape[1], dc2.weight.shape[1]

        def compute(*_: Any) -> torch.Tensor:
            add1 = dc1.bias.repeat(4).expand(h * w, -1)
            add2 = dc2.bias.repeat(4).expand(h * w, 4, -1)
            if dec.use_high_res_features:
                feat_s0, feat_s1 = feats["high_res_feats"]
                f1 = feat_s1[0].permute(1, 2, 0).reshape(h, 2, w, 2, c1).permute(0, 2, 1, 3, 4)
                f0 = feat_s0[0].permute(1, 2, 0).reshape(h, 2, 2, w, 2, 2, c2).permute(0, 3, 1, 4, 2, 5, 6)
                add1 = add1 + f1.reshape(h * w, 4 * c1)
                add2 = add2 + f0.reshape(h * w, 4, 4 * c2)
            return add1.reshape(h * w, 4 * c1).contiguous(), add2.reshape(h * w, 4, 4 * c2).contiguous()

        return thin.memo.get("subpixel", feats["image_embed"], compute=compute)

    def _decode_all(
        self, thin: ThinDecoder, tokens: torch.Tensor, *, size: tuple[int, int]
    ) -> list[tuple[_Candidates, int]]:
        """Every chunk of prompts, in order; on the CPU on `decode_workers()` threads."""
        chunks = [tokens[b] for b in self._batches(len(tokens))]
        workers = decode_workers(_device(self.model), len(chunks))
        if workers == 1:
            return [self._decode(thin, chunk, size=size) for chunk in chunks]
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads // workers))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="samadapt-masks") as pool:
                return list(pool.map(lambda chunk: self._decode_chunk(thin, chunk, size=size), chunks))
        finally:
            torch.set_num_threads(threads)

    def _batches(self, n: int) -> Iterator[slice]:
        for start in range(0, n, DECODE_CHUNK):
            yield slice(start, start + DECODE_CHUNK)

    # -- the generator ------------------------------------------------------------------------------------------

    def _upsample(self, logits: torch.Tensor, size: tuple[int, int], *, subpixel: bool) -> torch.Tensor:
        """Low-resolution logits [K, h, w] -> [K, H, W] as `SAM2Transforms.postprocess_masks` does."""
        return upsample(_spatial(logits) if subpixel else logits, size)

    @torch.inference_mode()
    def generate_arrays(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(masks [K, H, W] bool, predicted IoU [K]) of one HxWx3 uint8 image, in the official output order."""
        height, width = image.shape[:2]
        size = (height, width)
        with self._encoder_autocast():
            self.predictor.set_image(image)
        if self.precision == "bf16":  # the decoder reads fp32 features (see `_product_dtype`)
            feats = self.predictor._features
            feats["image_embed"] = feats["image_embed"].float()
            feats["high_res_feats"] = [f.float() for f in feats["high_res_feats"]]
        try:
            grid = point_grid(self.points_per_side) * np.array([[width, height]])
            points = torch.as_tensor(grid, dtype=torch.float32, device=_device(self.model))
            points = self.predictor._transforms.transform_coords(points, normalize=True, orig_hw=size)
            side = 4 * self.predictor._bb_feat_sizes[-1][0]  # the decoder's low-resolution mask side
            tokens, dense = self._prompts(points)
            counts = {"candidates": 3 * len(points) if self.multimask_output else len(points)}
            thin = ThinDecoder(
                self.model.sam_mask_decoder,
                image_embed=self.predictor._features["image_embed"],
                dense=dense,
                image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            )
            decoded = self._decode_all(thin, tokens, size=size)
            parts = [part for part, _ in decoded]
            cand = _Candidates.cat(parts, side=side)
            counts["points_decoded"] = len(tokens)
            counts["points_upscaled"] = sum(n for _, n in decoded)
        finally:
            self.predictor.reset_predictor()
        logits, iou = cand.logits, cand.iou
        subpixel = True  # the decoder's pixel order (see `_masks`) until something needs the image order
        thr = self.mask_threshold
        if cand.counts:  # filtered chunk by chunk in the workers (`_prefilter`)
            counts.update(cand.counts)
        else:
            if self.pred_iou_thresh > 0.0:
                keep = iou > self.pred_iou_thresh
                logits, iou = logits[keep], iou[keep]
            counts["after_iou"] = len(iou)
            if self.min_mask_region_area > 0 and len(iou):
                logits, subpixel = _spatial(logits), False
                logits = fill_small_regions(logits, area=self.min_mask_region_area, threshold=thr)
        if cand.boxes is None:  # else the full-image bounds and boxes ran in the workers
            status, boxes = self._stability_status(logits, size=size, subpixel=subpixel)
            alive = status != UNSTABLE
            counts["after_stability_bounds"] = int(alive.sum())
            counts["stability_undecided"] = int((status == UNDECIDED).sum())
            cand = _Candidates(
                logits[alive], iou[alive], boxes=boxes[alive], undecided=(status == UNDECIDED)[alive]
            )
        keep = self._nms(cand, size=size, subpixel=subpixel, counts=counts)
        logits, iou = cand.logits[keep], cand.iou[keep]
        counts["after_nms"] = len(iou)
        self.last_counts = counts
        masks = np.zeros((len(iou), height, width), bool)
        for start in range(0, len(iou), UPSAMPLE_CHUNK):
            full = self._upsample(logits[start : start + UPSAMPLE_CHUNK], size, subpixel=subpixel)
            masks[start : start + len(full)] = (full > thr).cpu().numpy()
        return masks, iou.float().cpu().numpy()


def stable_nms(
    iou: torch.Tensor,
    boxes: torch.Tensor,
    undecided: torch.Tensor,
    *,
    exact: Callable[[torch.Tensor], torch.Tensor],
    nms_thresh: float,
) -> tuple[torch.Tensor, int, int]:
    """(kept indices in NMS order, candidates settled exactly, of which unstable) of box NMS (torchvision's
    `batched_nms`, predicted IoU `iou` as score, as the official generator) over the candidates that pass the
    stability filter, given candidates known stable or `undecided` [K] bool, their boxes [K, 4] and `exact(idx)`,
    the exact stability decision [len(idx)] bool of some of the undecided ones.

    The filter is only settled where NMS needs it: NMS over the stable and the undecided candidates, then the
    exact stability of the undecided ones it kept; the unstable among them are dropped and NMS reruns, until every
    kept candidate is known stable. Exact: an undecided candidate that is never kept never suppresses another, so
    it changes no kept set whether it is stable or not; and a candidate a kept mask suppresses (most of them)
    never needs its stability computed."""
    undecided = undecided.clone()
    alive = torch.ones(len(iou), dtype=torch.bool, device=iou.device)
    settled = failed = 0
    while True:
        idx = alive.nonzero().squeeze(1)
        if len(idx) == 0:
            return idx, settled, failed
        b = boxes[idx].float()
        keep = idx[batched_nms(b, iou[idx], torch.zeros_like(b[:, 0]), nms_thresh)]
        check = keep[undecided[keep]]
        if len(check) == 0:
            return keep, settled, failed
        stable = exact(check)
        undecided[check] = False
        alive[check[~stable]] = False
        settled += len(check)
        failed += int((~stable).sum())


def _subpixel_weights(w1: torch.Tensor, w2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two transposed convolutions' weights [in, out, 2, 2] as per-pixel matrices: [(i, j, c1), in] and
    [(k, l, c2), c1]."""
    return (
        w1.permute(2, 3, 1, 0).reshape(-1, w1.shape[0]).contiguous(),
        w2.permute(2, 3, 1, 0).reshape(-1, w2.shape[0]).contiguous(),
    )


def _gelu_(act: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`act(x)` in place where `act` is a GELU (the decoder's activations; no new buffer for the largest
    intermediates), else `act(x)`."""
    if isinstance(act, torch.nn.GELU):
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    return act(x)


def _spatial(logits: torch.Tensor) -> torch.Tensor:
    """[K, 4h, 4w] logits in sub-pixel order (flat (y, x, i, j, k, l), pixel (4y + 2i + k, 4x + 2j + l)) -> the
    image order."""
    k, height, width = logits.shape
    pair = _PAIRS.get(logits.element_size())
    if pair is not None and logits.is_contiguous() and logits.storage_offset() % 2 == 0:
        # each (l) pair moved as one element twice the size: the same bytes, ~10x faster than torch's copy of a
        # permutation whose innermost run is 2 elements long (2-core AMX Xeon: 0.03 against 0.3 ms per mask)
        x = logits.view(pair).view(k, height // 4, width // 4, 2, 2, 2)  # (y, x, i, j, k)
        return x.permute(0, 1, 3, 5, 2, 4).contiguous().view(logits.dtype).view(k, height, width)
    x = logits.reshape(k, height // 4, width // 4, 2, 2, 2, 2)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(k, height, width)


# an integer dtype of twice the element size, for `_spatial`
_PAIRS = {1: torch.int16, 2: torch.int32, 4: torch.int64}


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
