"""SAM 3's image encoder (the ViT trunk and the SAM 3 SimpleFPN neck), our own code, the official parameter names.

``Sam3ViTEncoder(**ENCODERS["sam3"].arch, img_size=1008)`` computes what the official
``sam3.model.vl_combiner.SAM3VLBackbone.forward_image`` computes for the image (``vision_features`` and
``backbone_fpn``); its ``state_dict()`` keys are the official ``Sam3DualViTDetNeck`` keys (``trunk.*``, ``convs.*``),
i.e. the ``detector.backbone.vision_backbone.*`` tensors of ``sam3.pt`` without that prefix
(``select_sam3_encoder_state`` picks them). No runtime dependency on the ``sam3`` package.

The official architecture (``sam3.model_builder._create_vit_backbone`` / ``_create_vit_neck``):
- patch embedding: a 14 x 14 stride-14 conv without bias -> a 72 x 72 token grid at 1008 px;
- absolute position embedding trained at 336 px (24 x 24 plus a class-token slot, which is dropped) and *tiled*
  (not interpolated) over the grid, then ``ln_pre`` (LayerNorm, eps 1e-5);
- 32 pre-norm blocks (LayerNorm eps 1e-5, MLP ratio 4.625 with exact GELU), all with 2-D axial RoPE on q and k
  (theta 1e4; head dim split into x and y halves); 24 x 24 windowed attention except in the global blocks
  (7, 15, 23, 31), whose RoPE positions are scaled by 24 / 72 (``use_interp_rope``). Windows are zero-padded after
  the norm, as in the official ``window_partition``;
- the neck: four convs branches from the last block's output (4x: two 2x2 transposed convs with GELU; 2x: one;
  1x; 0.5x: max-pool), each then a 1x1 and a 3x3 conv to 256 channels. The image model discards the 0.5x level
  (``scalp=1``): its weights are kept (so the keys match) but it is not computed.

The image embedding is the 1x level: ``[B, 256, S/14, S/14]`` (``[B, 256, 72, 72]`` at 1008).

Layers ``forward(x, layers=...)`` can return (S = input side, default 1008):
- ``0``..``depth-1`` (int): block outputs ``[B, embed_dim, S/14, S/14]``;
- ``"fpn0"``, ``"fpn1"``, ``"fpn2"``: ``backbone_fpn``, 256 channels at 4x, 2x and 1x the grid (``"fpn2"`` is the
  image embedding).

Speed (CPU): qkv/proj/MLP linears through oneDNN with packed weights and fused GELU (``_sam_vit_linear.py``) on
AVX-512 CPUs, plain ``F.linear`` (MKL) on AVX2-only ones where oneDNN's fp32 GEMM is slower; the residual stream
kept in one contiguous [B, H, W, C] layout; ``F.scaled_dot_product_attention`` (its CPU flash kernel is already
query-blocked); windowed blocks compute qkv on the real tokens only when the grid needs padding (the
official padded tokens carry exactly the qkv bias). In bf16 (module and input cast to bf16) the residual stream and
LayerNorm statistics stay float32 and RoPE is applied in float32, as the official ``apply_rotary_enc`` does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from samadapt.encoders._sam_vit_linear import linear
from samadapt.encoders.sam_vit import _layer_norm  # the mixed-precision LayerNorm both ViTs use
from samadapt.errors import CheckpointError, ConfigError

_LN_EPS = 1e-5  # sam3 builds its LayerNorms as partial(nn.LayerNorm, eps=1e-5)
# Prefixes under which the official files hold the vision backbone: sam3.pt (image+video model), an image model's
# own state_dict (``Sam3Image``), the backbone combiner's, and an encoder-only file (ours).
OFFICIAL_PREFIXES = (
    "detector.backbone.vision_backbone.",
    "backbone.vision_backbone.",
    "vision_backbone.",
    "",
)
_PROBE = "trunk.patch_embed.proj.weight"
# oneDNN's packed, GELU-fused linears (_sam_vit_linear.py) win on AVX-512 CPUs (measured for SAM ViT); on AVX2-only
# CPUs MKL's sgemm behind F.linear is faster (fp32 5184 x 1024 -> 4736 + GELU: 3.1 s vs 5.4 s, 2 loaded EPYC cores).
_ONEDNN_LINEAR = torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2")
_HF_PROBE = "vision_encoder.backbone.embeddings.patch_embeddings.projection.weight"  # transformers' Sam3Model


class Sam3ViTEncoder(nn.Module):
    """SAM 3 ViT trunk (RoPE, windowed + global attention) and the SAM 3 SimpleFPN neck."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: Sequence[int],
        patch_size: int = 14,
        window_size: int = 24,
        mlp_ratio: float = 4.625,
        pretrain_grid: int = 24,
        rope_theta: float = 10000.0,
        out_chans: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        img_size: int = 1008,
        in_chans: int = 3,
    ) -> None:
        """Numbers come from ``samadapt.encoders.registry`` (``SAM3_VIT``); ``img_size`` is the input side."""
        super().__init__()
        if img_size % patch_size:
            raise ConfigError(f"image size {img_size} is not a multiple of the patch size {patch_size}")
        if not global_attn_indexes or max(global_attn_indexes) != depth - 1:
            # The official trunk returns the output of its last global block; blocks after it would be wasted.
            raise ConfigError(
                f"SAM 3's last block ({depth - 1}) must be a global block; got {global_attn_indexes}"
            )
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.embed_dim = embed_dim
        self.out_chans = out_chans
        self.scale_factors = tuple(float(s) for s in scale_factors)
        self.trunk = _Trunk(
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            global_attn_indexes=tuple(global_attn_indexes),
            patch_size=patch_size,
            window_size=window_size,
            mlp_ratio=mlp_ratio,
            pretrain_grid=pretrain_grid,
            rope_theta=rope_theta,
            grid=self.grid,
            in_chans=in_chans,
        )
        self.convs = nn.ModuleList(_fpn_branch(embed_dim, out_chans, s) for s in self.scale_factors)
        # The image model drops the lowest-resolution level (SAM3VLBackbone(scalp=1)); it is never computed here.
        self.num_levels = len(self.scale_factors) - 1

    def layer_names(self) -> list[int | str]:
        """Every name ``forward(layers=...)`` accepts."""
        return [*range(len(self.trunk.blocks)), *(f"fpn{i}" for i in range(self.num_levels))]

    def layer_shape(self, name: int | str, image_size: int | None = None) -> tuple[int, int, int]:
        """(channels, height, width) of one layer's output for a square input of ``image_size``."""
        grid = (image_size or self.img_size) // self.patch_size
        key = _layer_key(name)
        if isinstance(key, int) and 0 <= key < len(self.trunk.blocks):
            return self.embed_dim, grid, grid
        if (
            isinstance(key, str)
            and key.startswith("fpn")
            and key[3:].isdigit()
            and int(key[3:]) < self.num_levels
        ):
            side = int(grid * self.scale_factors[int(key[3:])])
            return self.out_chans, side, side
        raise ConfigError(f"unknown SAM 3 layer {name!r}; known layers: blocks 0..{len(self.trunk.blocks) - 1}, "
                          f"{', '.join(f'fpn{i}' for i in range(self.num_levels))}")  # fmt: skip

    def forward(
        self, x: Tensor, layers: Sequence[int | str] | None = None
    ) -> tuple[Tensor, dict[int | str, Tensor]]:
        """x: [B, 3, S, S] preprocessed images in the parameters' dtype -> (embedding [B, 256, S/14, S/14],
        ``{layer: tensor}`` for each requested layer), contiguous, in the input's dtype."""
        wanted = [_layer_key(name) for name in layers or ()]
        for name in wanted:
            self.layer_shape(name)
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ConfigError(
                f"expected input images of {self.img_size}x{self.img_size}, got {tuple(x.shape[-2:])}"
            )
        blocks = {k for k in wanted if isinstance(k, int)}
        feats, block_out = self.trunk(x, keep=blocks)
        levels = {int(k[3:]) for k in wanted if isinstance(k, str)} | {self.num_levels - 1}
        fpn = {i: self.convs[i](feats).contiguous() for i in sorted(levels)}
        out: dict[int | str, Tensor] = {}
        for name, key in zip(layers or (), wanted):
            out[name] = block_out[key] if isinstance(key, int) else fpn[int(key[3:])]
        return fpn[self.num_levels - 1], out


def _layer_key(name: int | str) -> int | str:
    """Block indices may come as decimal strings (the store's output names are strings)."""
    if isinstance(name, str) and name.strip().isdigit():
        return int(name)
    if isinstance(name, bool) or not isinstance(name, int | str):
        raise ConfigError(f"SAM 3 layers are block indices or 'fpn0'..; got {name!r}")
    return name


def _fpn_branch(dim: int, out_chans: int, scale: float) -> nn.Sequential:
    """One level of the official Sam3DualViTDetNeck (same module names, hence the same state_dict keys)."""
    branch = nn.Sequential()
    if scale == 4.0:
        branch.add_module("dconv_2x2_0", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        branch.add_module("gelu", nn.GELU())
        branch.add_module("dconv_2x2_1", nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2))
        width = dim // 4
    elif scale == 2.0:
        branch.add_module("dconv_2x2", nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2))
        width = dim // 2
    elif scale == 1.0:
        width = dim
    elif scale == 0.5:
        branch.add_module("maxpool_2x2", nn.MaxPool2d(kernel_size=2, stride=2))
        width = dim
    else:
        raise ConfigError(f"SAM 3 neck scale factor {scale} is not one of 4, 2, 1, 0.5")
    branch.add_module("conv_1x1", nn.Conv2d(width, out_chans, kernel_size=1))
    branch.add_module("conv_3x3", nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1))
    return branch


class _PatchEmbed(nn.Module):
    def __init__(self, *, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1).contiguous()  # [B, h, w, C], contiguous once


class _Trunk(nn.Module):
    """The official ``sam3.model.vitdet.ViT`` as SAM 3 configures it (no class token kept, no rel-pos)."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        num_heads: int,
        global_attn_indexes: tuple[int, ...],
        patch_size: int,
        window_size: int,
        mlp_ratio: float,
        pretrain_grid: int,
        rope_theta: float,
        grid: int,
        in_chans: int,
    ) -> None:
        super().__init__()
        self.patch_embed = _PatchEmbed(in_chans=in_chans, embed_dim=embed_dim, patch_size=patch_size)
        # Trained with a class token (pretrain_use_cls_token): slot 0 is kept in the weights and dropped in use.
        self.pos_embed = nn.Parameter(torch.zeros(1, pretrain_grid * pretrain_grid + 1, embed_dim))
        self.ln_pre = nn.LayerNorm(embed_dim, eps=_LN_EPS)
        head_dim = embed_dim // num_heads
        self.blocks = nn.ModuleList()
        for i in range(depth):
            is_global = i in global_attn_indexes
            side = grid if is_global else window_size
            # use_interp_rope with rope_pt_size = the window: global blocks' positions are scaled by window / grid.
            scale = window_size / grid if is_global else 1.0
            self.blocks.append(
                _Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    window_size=0 if is_global else window_size,
                    rope=rope_tables(head_dim=head_dim, side=side, theta=rope_theta, scale=scale),
                )
            )

    def forward(self, x: Tensor, *, keep: set[int]) -> tuple[Tensor, dict[int, Tensor]]:
        dtype = x.dtype
        x = self.patch_embed(x)
        x = x + tiled_position_embedding(self.pos_embed, x.shape[1], x.shape[2]).to(x.dtype)
        # Residual stream in float32 whatever the compute dtype (as in sam_vit.py).
        x = _layer_norm(x.float(), self.ln_pre).float()
        out: dict[int, Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in keep:
                out[i] = x.permute(0, 3, 1, 2).to(dtype, memory_format=torch.contiguous_format)
        return x.to(dtype).permute(0, 3, 1, 2), out


def tiled_position_embedding(pos_embed: Tensor, height: int, width: int) -> Tensor:
    """The official ``get_abs_pos(..., tiling=True)``: drop the class slot, tile the square table, crop: [1,h,w,C]."""
    table = pos_embed[:, 1:]
    side = int(round(table.shape[1] ** 0.5))
    grid = table.reshape(1, side, side, -1)
    if (side, side) == (height, width):
        return grid
    reps = (height // side + 1, width // side + 1)
    return grid.tile(1, *reps, 1)[:, :height, :width]


def rope_tables(*, head_dim: int, side: int, theta: float, scale: float) -> Tensor:
    """The official ``compute_axial_cis``: complex64 [side*side, head_dim/2], unit phasors of the x angles then the
    y angles of each token (tokens in row-major order), computed in float32 as the official code does."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 4)[: head_dim // 4].float() / head_dim))
    t = torch.arange(side * side, dtype=torch.float32)
    t_x = (t % side).float() * scale
    t_y = torch.div(t, side, rounding_mode="floor").float() * scale
    angles = torch.cat([torch.outer(t_x, freqs), torch.outer(t_y, freqs)], dim=-1)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, freqs: Tensor) -> Tensor:
    """Rotate consecutive pairs (x[2i], x[2i+1]) of x [..., L, D] by the phasors ``freqs`` [L, D/2], in float32.

    A complex multiply, as the official ``apply_rotary_enc``: measured 10x faster on CPU than the same rotation
    written with real cos/sin tensors (strided pair views cost more than the arithmetic).
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


def _linear(x: Tensor, layer: nn.Linear, *, gelu: bool = False) -> Tensor:
    """``layer(x)`` (then exact GELU): oneDNN's fused path where it is the faster one, else F.linear."""
    if _ONEDNN_LINEAR:
        return linear(x, layer, gelu=gelu)
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y) if gelu else y


class _Mlp(nn.Module):
    """timm's Mlp as sam3 builds it (fc1, exact GELU, fc2; same parameter names)."""

    def __init__(self, *, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return _linear(_linear(x, self.fc1, gelu=True), self.fc2)


class _Block(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, mlp_ratio: float, window_size: int, rope: Tensor) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.attn = _Attention(dim=dim, num_heads=num_heads, rope=rope)
        self.norm2 = nn.LayerNorm(dim, eps=_LN_EPS)
        self.mlp = _Mlp(dim=dim, hidden=int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        """x: the float32 residual stream [B, H, W, C]; the block computes in its parameters' dtype."""
        x = x + self.attn(_layer_norm(x, self.norm1), window_size=self.window_size)
        return x + self.mlp(_layer_norm(x, self.norm2))


class _Attention(nn.Module):
    def __init__(self, *, dim: int, num_heads: int, rope: Tensor) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        # Not in the state_dict (the official ``freqs_cis`` buffers are a deterministic function of the geometry),
        # and not buffers either: they stay float32 when the module is cast to bf16, as the official complex table.
        self._rope = rope

    def _rope_on(self, device: torch.device) -> Tensor:
        if self._rope.device != device:
            self._rope = self._rope.to(device)
        return self._rope

    def forward(self, x: Tensor, *, window_size: int) -> Tensor:
        """x: normalised tokens [B, H, W, C]; global attention when window_size is 0. Returns [B, H, W, C]."""
        batch, height, width, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        # qkv on the real tokens only; the official code zero-pads the normalised tokens to whole windows before
        # qkv, so its padded tokens carry exactly the qkv bias (and take part in attention, unmasked): fill them so.
        if window_size > 0 and height % window_size == 0 and width % window_size == 0:
            # No padding (1008 px: 72 = 3 x 24): partition the C-wide tokens, as the official code does, rather
            # than the 3C-wide qkv output (measured faster: a third of the bytes through the permuting copy).
            nh, nw, tokens = height // window_size, width // window_size, window_size * window_size
            win = x.view(batch, nh, window_size, nw, window_size, dim).permute(0, 1, 3, 2, 4, 5)
            qkv = _linear(win.reshape(-1, tokens, dim), self.qkv)
            q, k, v = qkv.view(-1, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            freqs = self._rope_on(x.device)
            out = F.scaled_dot_product_attention(apply_rope(q, freqs), apply_rope(k, freqs), v)
            out = _linear(out.transpose(1, 2).reshape(-1, window_size, window_size, dim), self.proj)
            out = out.view(batch, nh, nw, window_size, window_size, dim).permute(0, 1, 3, 2, 4, 5)
            return out.reshape(batch, height, width, dim)
        qkv = _linear(x, self.qkv)
        if window_size > 0:
            qkv, (hp, wp) = _pad_to_multiple(qkv, window_size, fill=self.qkv.bias)
            nh, nw, tokens = hp // window_size, wp // window_size, window_size * window_size
            qkv = qkv.view(batch, nh, window_size, nw, window_size, 3, heads, head_dim)
            qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, -1, heads, tokens, head_dim)
        else:
            qkv = qkv.view(batch, height * width, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        freqs = self._rope_on(x.device)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        out = F.scaled_dot_product_attention(q, k, v)  # [items, heads, tokens, head_dim]
        if window_size > 0:
            out = out.view(batch, nh, nw, heads, window_size, window_size, head_dim)
            out = out.permute(0, 1, 4, 2, 5, 3, 6).reshape(batch, hp, wp, dim)[:, :height, :width]
        else:
            out = out.view(batch, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)
        return _linear(out.reshape(batch, height, width, dim).contiguous(), self.proj)


def _pad_to_multiple(x: Tensor, multiple: int, *, fill: Tensor | None) -> tuple[Tensor, tuple[int, int]]:
    """Pad [B, H, W, D] at the bottom/right to multiples of ``multiple`` with the vector ``fill`` (or zeros)."""
    batch, height, width, depth = x.shape
    hp, wp = height + (-height) % multiple, width + (-width) % multiple
    if (hp, wp) == (height, width):
        return x, (hp, wp)
    out = x.new_empty(batch, hp, wp, depth)
    out[:, :height, :width] = x
    value = fill.to(x.dtype) if fill is not None else 0.0
    out[:, height:] = value
    out[:, :height, width:] = value
    return out, (hp, wp)


def find_sam3_prefix(state: Mapping[str, Tensor]) -> str | None:
    """The prefix under which ``state`` holds a SAM 3 vision backbone, or None."""
    for prefix in OFFICIAL_PREFIXES:
        if prefix + _PROBE in state and prefix + "convs.0.conv_1x1.weight" in state:
            return prefix
    return None


def select_sam3_encoder_state(
    state: Mapping[str, Tensor], *, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """The image-encoder part of an official SAM 3 state dict, with ``Sam3ViTEncoder``'s keys.

    Takes the vision backbone's ``trunk.*`` and ``convs.*`` (the SAM 3 neck); drops the RoPE ``freqs_cis``
    buffers (recomputed), the SAM 2-style ``sam2_convs.*`` neck used by the interactive/video predictor, and
    everything else (text encoder, detector, tracker).
    """
    prefix = find_sam3_prefix(state)
    if prefix is None:
        raise CheckpointError(
            f"checkpoint {source}: holds no SAM 3 vision backbone (no detector.backbone.vision_backbone.trunk.* keys)"
        )
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        local = key[len(prefix) :]
        if local.startswith(("trunk.", "convs.")) and not local.endswith(".attn.freqs_cis"):
            out[local] = value
    return out


def describe_sam3(state: Mapping[str, Tensor]) -> str | None:
    """'a SAM 3 ViT image encoder (embed dim D, N blocks)' when ``state`` holds one (any official prefix)."""
    prefix = find_sam3_prefix(state)
    if prefix is None:
        if any(k.endswith(_HF_PROBE) for k in state):
            return "a Hugging Face transformers SAM 3 model (its own key names; samadapt reads the official sam3.pt)"
        return None
    dim = state[prefix + _PROBE].shape[0]
    depth = len({k[len(prefix) :].split(".", 3)[2] for k in state if k.startswith(prefix + "trunk.blocks.")})
    return f"a SAM 3 ViT image encoder (embed dim {dim}, {depth} blocks)"
