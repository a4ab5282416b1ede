"""SAM's ViT image encoder (SAM vit_b/l/h, MedSAM), with the official parameter names and a fast attention.

``SamViTEncoder(**ENCODERS["sam_vit_b"].arch, img_size=1024)`` has exactly the ``state_dict()`` keys of
``segment_anything.modeling.ImageEncoderViT`` (the official checkpoints' ``image_encoder.*`` keys without the
prefix) and computes the same function: in fp32 it matches the official encoder to float rounding. It runs in the
dtype of its parameters; cast the module and the input to bf16 for the fast path (no autocast needed). In bf16 the
residual stream and LayerNorm statistics stay float32; GEMMs, attention and GELU run in bf16.

Speed comes from the attention (``attention.py``: query-blocked, no N x N bias tensor), from computing qkv/proj of
windowed blocks on the real tokens only (not the padded windows), and from oneDNN linear layers with fused bias and
GELU (``_sam_vit_linear.py``).

Other input sizes (e.g. 512 or 256, a common choice for fine-tuning on small medical images): build the encoder with
``img_size=S`` and load 1024-trained weights as usual; a load hook resizes the position tables (see
``resize_position_tables``). Windowed blocks keep their 14 x 14 windows (the grid is zero-padded to a multiple of 14,
as in the official code).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samadapt.encoders._sam_vit_linear import linear
from samadapt.encoders.attention import rel_pos_attention, rel_pos_terms
from samadapt.errors import ConfigError

_LN_EPS = 1e-6  # segment_anything builds every LayerNorm (and LayerNorm2d) with eps=1e-6


class SamViTEncoder(nn.Module):
    """SAM ViT image encoder: patch embedding, ViT blocks (windowed + global attention), neck to ``out_chans``."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: Sequence[int],
        patch_size: int = 16,
        window_size: int = 14,
        out_chans: int = 256,
        mlp_ratio: float = 4.0,
        img_size: int = 1024,
        in_chans: int = 3,
    ) -> None:
        """Numbers come from ``samadapt.encoders.registry`` (``SAM_VIT_B`` etc.); ``img_size`` is the input side."""
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.global_attn_indexes = tuple(global_attn_indexes)
        grid = img_size // patch_size
        self.patch_embed = _PatchEmbed(in_chans=in_chans, embed_dim=embed_dim, patch_size=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.blocks = nn.ModuleList(
            _Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                window_size=0 if i in self.global_attn_indexes else window_size,
                grid=grid,
            )
            for i in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, kernel_size=1, bias=False),
            _LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            _LayerNorm2d(out_chans),
        )
        self.register_load_state_dict_pre_hook(_resize_on_load)

    def forward(
        self, x: Tensor, layers: Sequence[int | str] | None = None
    ) -> tuple[Tensor, dict[int, Tensor]]:
        """x: [B, 3, S, S] preprocessed images, in the parameters' dtype.

        Returns the neck output [B, out_chans, S/16, S/16] and ``{i: output of block i as [B, C, S/16, S/16]}``
        for each requested block index, contiguous, in the input's dtype.
        """
        wanted = {_block_index(i) for i in layers or ()}
        bad = sorted(i for i in wanted if not 0 <= i < len(self.blocks))
        if bad:
            raise ConfigError(
                f"block indices {bad} out of range; this encoder has blocks 0..{len(self.blocks) - 1}"
            )
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ConfigError(
                f"expected input images of {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}"
            )
        dtype = x.dtype
        # The residual stream stays float32 whatever the compute dtype: in bf16 it halves the error against the
        # official fp32 output (measured 1.5e-2 -> ~7e-3 of the output's max) for a few cheap passes per block.
        x = (self.patch_embed(x) + self.pos_embed).float()
        features: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in wanted:
                features[i] = x.permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)
        neck = self.neck(x.to(dtype).permute(0, 3, 1, 2))
        return neck.contiguous(), features

    def adapt_state_dict(self, state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Official encoder weights (any input size) resized to this encoder's input size; see
        ``resize_position_tables``. Loading also does this by itself (a load_state_dict pre-hook)."""
        return resize_position_tables(
            state_dict,
            img_size=self.img_size,
            patch_size=self.patch_size,
            global_attn_indexes=self.global_attn_indexes,
        )


def _block_index(layer: int | str) -> int:
    """A block index given as an int or as its decimal string (the store's output names are strings)."""
    if isinstance(layer, int) and not isinstance(layer, bool):
        return layer
    if isinstance(layer, str) and layer.strip().lstrip("-").isdigit():
        return int(layer)
    raise ConfigError(f"SAM ViT layers are block indices (integers); got {layer!r}")


class _PatchEmbed(nn.Module):
    def __init__(self, *, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        # [B, C, h, w] -> [B, h, w, C], made contiguous once: every later elementwise op keeps its input's memory
        # layout, and a channel-strided token map would cost a copy before each LayerNorm and linear layer.
        return self.proj(x).permute(0, 2, 3, 1).contiguous()


class _LayerNorm2d(nn.Module):
    """Channel LayerNorm of a [B, C, H, W] map (segment_anything's LayerNorm2d, same parameter names)."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, _LN_EPS)
        return y.permute(0, 3, 1, 2)


class _Mlp(nn.Module):
    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return linear(linear(x, self.lin1, gelu=True), self.lin2)


class _Block(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float, window_size: int, grid: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        side = window_size if window_size > 0 else grid
        self.attn = _Attention(dim=dim, num_heads=num_heads, side=side)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = _Mlp(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """x: the float32 residual stream [B, H, W, C]; the block computes in its parameters' dtype."""
        x = x + self.attn(_layer_norm(x, self.norm1), window_size=self.window_size)
        return x + self.mlp(_layer_norm(x, self.norm2))


def _layer_norm(x: Tensor, norm: nn.LayerNorm) -> Tensor:
    """LayerNorm with statistics in the residual stream's precision and output in the layer's dtype."""
    if x.dtype == norm.weight.dtype:
        return norm(x)
    weight, bias = norm.weight.to(x.dtype), norm.bias.to(x.dtype)
    return F.layer_norm(x, norm.normalized_shape, weight, bias, norm.eps).to(norm.weight.dtype)


class _Attention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, side: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * side - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * side - 1, head_dim))

    def forward(self, x: Tensor, *, window_size: int) -> Tensor:
        """x: normalised tokens [B, H, W, C]; global attention when window_size is 0. Returns [B, H, W, C]."""
        batch, height, width, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        # qkv is computed on the real tokens only. The official code zero-pads the normalised tokens to whole
        # windows and then applies qkv, so its padded tokens carry exactly the qkv bias: fill them with it.
        qkv = linear(x, self.qkv)
        if window_size > 0:
            qkv, (hp, wp) = _pad_to_multiple(qkv, window_size, fill=self.qkv.bias)
            nh, nw, side = hp // window_size, wp // window_size, (window_size, window_size)
            qkv = qkv.view(batch, nh, window_size, nw, window_size, 3, heads, head_dim)
            qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, window_size * window_size, head_dim)
        else:
            side = (height, width)
            qkv = qkv.view(batch, height * width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
            qkv = qkv.reshape(3, batch * heads, height * width, head_dim)  # a view when batch == 1
        q, k, v = qkv.unbind(0)
        rel_h, rel_w = rel_pos_terms(q, self.rel_pos_h, self.rel_pos_w, side)
        out = rel_pos_attention(q, k, v, rel_h, rel_w, scale=self.scale)  # [items, tokens, head_dim]
        if window_size > 0:
            out = out.view(batch, nh, nw, heads, window_size, window_size, head_dim)
            out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, hp, wp, dim)[:, :height, :width]
        else:
            out = out.view(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)
        return linear(out.reshape(batch, height, width, dim).contiguous(), self.proj)


def _pad_to_multiple(x: Tensor, multiple: int, *, fill: Tensor | None) -> tuple[Tensor, tuple[int, int]]:
    """Pad [B, H, W, D] at the bottom/right to multiples of ``multiple`` with the vector ``fill`` (or zeros)."""
    batch, height, width, depth = x.shape
    hp, wp = height + (-height) % multiple, width + (-width) % multiple
    if (hp, wp) == (height, width):
        return x, (hp, wp)
    out = x.new_empty(batch, hp, wp, depth)
    out[:, :height, :width] = x
    value = fill if fill is not None else 0.0
    out[:, height:] = value
    out[:, :height, width:] = value
    return out, (hp, wp)


def resize_position_tables(
    state_dict: Mapping[str, Tensor], *, img_size: int, patch_size: int, global_attn_indexes: Sequence[int]
) -> dict[str, Tensor]:
    """Adapt SAM-ViT encoder weights trained at one input size to another (keys without ``image_encoder.``).

    Exactly what is done (the convention of common SAM fine-tuning code, e.g. SAMed):
    - ``pos_embed`` [1, g0, g0, C] -> [1, g, g, C] with g = img_size / patch_size: bicubic interpolation
      (``F.interpolate(mode="bicubic", align_corners=False)``, no antialiasing), computed in float32.
    - ``blocks.{i}.attn.rel_pos_h`` / ``rel_pos_w`` of the global-attention blocks [2 g0 - 1, head_dim] ->
      [2 g - 1, head_dim]: linear interpolation along the table (``align_corners=False``), which is also what the
      official ``get_rel_pos`` does on the fly when a table has the wrong length.
    - Windowed blocks' tables ([2 * 14 - 1, head_dim]) and every other tensor are returned unchanged.
    """
    grid = img_size // patch_size
    out = dict(state_dict)
    pos = out.get("pos_embed")
    if pos is not None and tuple(pos.shape[1:3]) != (grid, grid):
        resized = F.interpolate(
            pos.float().permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic", align_corners=False
        )
        out["pos_embed"] = resized.permute(0, 2, 3, 1).to(pos.dtype).contiguous()
    for i in global_attn_indexes:
        for axis in ("h", "w"):
            key = f"blocks.{i}.attn.rel_pos_{axis}"
            table = out.get(key)
            if table is not None and table.shape[0] != 2 * grid - 1:
                resized = F.interpolate(
                    table.float().T[None], size=2 * grid - 1, mode="linear", align_corners=False
                )
                out[key] = resized[0].T.to(table.dtype).contiguous()
    return out


def _resize_on_load(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # Runs before load_state_dict copies tensors: weights saved at another input size are resized in the dict
    # load_state_dict works on (its own copy), so strict loading of 1024-trained weights into a 256/512 encoder works.
    assert isinstance(module, SamViTEncoder)
    local = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    resized = module.adapt_state_dict(local)
    for key, value in resized.items():
        if value is not local[key]:
            state_dict[prefix + key] = value
