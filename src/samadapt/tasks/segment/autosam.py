"""AutoSAM head (Hu, Xu, Shi, arXiv 2306.13731): SAM's mask decoder without prompts, one set of tokens per class.

Per class c the decoder sees the tokens [iou_c, mask_c,1 .. mask_c,k] (new, learned; k = 2 by default, as the
reference code's ``MaskDecoder(num_multimask_outputs=1)``, whose first mask is the one used) and the shared image
embedding; the two-way transformer runs once per class, all classes in one batched call (the embedding is
repeated B x num_classes times). Each class's first mask token goes through hypernetwork MLP 0 and is dotted
with the upscaled embedding: logits [B, num_classes, 4h, 4w]; softmax over classes (background included).

From the checkpoint (`load_sam_decoder_weights`): the transformer, the upscaling path and the hypernetwork MLPs
(`mask_decoder.*`, or `sam_mask_decoder.*` for SAM 2), plus the prompt encoder's positional encoding and
`no_mask_embed` (what the decoder saw added to the embedding when SAM was trained without a mask prompt; the
original AutoSAM code used a fresh random positional encoding and no `no_mask_embed`, we keep SAM's own).
Tokens are new, as in the paper; the IoU tokens are frozen at their random initialisation as in the reference
training script (``"iou" in name -> requires_grad = False``; `learn_iou_token=True` trains them). SAM's
IoU-prediction MLP is left out: nothing trains it (the reference freezes it too).
SAM 2's decoder adds high-resolution encoder features inside the upscaling path; the cached embedding holds only
the 64x64 level, so the head runs SAM 2's decoder weights without them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from samadapt.errors import CheckpointError
from samadapt.tasks.segment.transformer import MLP, PositionEmbeddingRandom, TwoWayTransformer, sam_upscaling

DECODER_PREFIXES = ("mask_decoder.", "sam_mask_decoder.")  # SAM / MedSAM, SAM 2
PROMPT_PREFIXES = ("prompt_encoder.", "sam_prompt_encoder.")
DEFAULT_MASK_TOKENS_PER_CLASS = (
    2  # AutoSAM's MaskDecoder(num_multimask_outputs=1): 1 + 1 mask tokens per class
)


class AutoSamHead(nn.Module):
    def __init__(
        self,
        *,
        num_classes: int,
        transformer_dim: int = 256,
        mask_tokens_per_class: int = DEFAULT_MASK_TOKENS_PER_CLASS,
        depth: int = 2,
        num_heads: int = 8,
        mlp_dim: int = 2048,
        learn_iou_token: bool = False,
    ) -> None:
        """num_classes includes background; mask_tokens_per_class=2 (the default) is the paper's code (1 used)."""
        super().__init__()
        if mask_tokens_per_class < 1:
            raise ValueError(f"mask_tokens_per_class must be >= 1, got {mask_tokens_per_class}")
        self.num_classes = num_classes
        self.mask_tokens_per_class = mask_tokens_per_class
        self.transformer_dim = transformer_dim
        self.transformer = TwoWayTransformer(
            depth=depth, embedding_dim=transformer_dim, num_heads=num_heads, mlp_dim=mlp_dim
        )
        self.iou_token = nn.Embedding(num_classes, transformer_dim)
        # AutoSAM's training script freezes every parameter named "iou": the IoU tokens stay at their random init
        self.iou_token.weight.requires_grad_(learn_iou_token)
        self.mask_tokens = nn.Embedding(num_classes * mask_tokens_per_class, transformer_dim)
        self.output_upscaling = sam_upscaling(transformer_dim)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(mask_tokens_per_class)
        )
        self.pe_layer = PositionEmbeddingRandom(transformer_dim // 2)
        self.no_mask_embed = nn.Embedding(1, transformer_dim)

    def forward(self, embeddings: Tensor) -> Tensor:
        """embeddings [B, 256, h, w] -> class logits [B, num_classes, 4h, 4w]."""
        b, d, h, w = embeddings.shape
        nc, k = self.num_classes, self.mask_tokens_per_class
        tokens = torch.cat([self.iou_token.weight[:, None], self.mask_tokens.weight.view(nc, k, d)], dim=1)
        tokens = tokens.repeat(b, 1, 1)  # [B*nc, 1+k, d], row b*nc + c
        src = (embeddings + self.no_mask_embed.weight.view(1, d, 1, 1)).repeat_interleave(nc, dim=0)
        pos = self.pe_layer((h, w)).unsqueeze(0).expand(b * nc, -1, -1, -1)
        hs, src = self.transformer(src, pos, tokens)
        upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b * nc, d, h, w))
        hyper = torch.stack(
            [mlp(hs[:, 1 + i]) for i, mlp in enumerate(self.output_hypernetworks_mlps)], dim=1
        )
        masks = hyper @ upscaled.flatten(2)  # [B*nc, k, 16hw]
        return masks[:, 0].reshape(b, nc, 4 * h, 4 * w)


def _sam2_to_sam_names(key: str) -> str:
    # SAM 2's transformer MLP is `mlp.layers.0/1`; SAM's (and ours) is `mlp.lin1/lin2`.
    return key.replace(".mlp.layers.0.", ".mlp.lin1.").replace(".mlp.layers.1.", ".mlp.lin2.")


def decoder_tensors(state: dict[str, Tensor], *, num_hypernetworks: int) -> dict[str, Tensor]:
    """The checkpoint tensors the prompt-free heads take, renamed to the head's parameter names."""
    out: dict[str, Tensor] = {}
    for prefix in DECODER_PREFIXES:
        for key, value in state.items():
            if not key.startswith(prefix):
                continue
            name = _sam2_to_sam_names(key[len(prefix) :])
            if name.startswith(("transformer.", "output_upscaling.")):
                out[name] = value
            elif (
                name.startswith("output_hypernetworks_mlps.") and int(name.split(".")[1]) < num_hypernetworks
            ):
                out[name] = value
    for prefix in PROMPT_PREFIXES:
        for name in ("pe_layer.positional_encoding_gaussian_matrix", "no_mask_embed.weight"):
            if prefix + name in state:
                out[name] = state[prefix + name]
    return out


def load_sam_decoder_weights(head: nn.Module, state: dict[str, Tensor], *, source: str) -> list[str]:
    """Copy the checkpoint's decoder tensors into every head parameter of the same name; return the names."""
    wanted = decoder_tensors(state, num_hypernetworks=len(getattr(head, "output_hypernetworks_mlps", [])))
    own = head.state_dict()
    take = {k: v for k, v in wanted.items() if k in own}
    if not take:
        raise CheckpointError(
            f"checkpoint {source}: holds no SAM mask decoder tensors (mask_decoder.* or sam_mask_decoder.*)"
        )
    for name, value in take.items():
        if tuple(value.shape) != tuple(own[name].shape):
            raise CheckpointError(
                f"checkpoint {source}: tensor {name} has shape {tuple(value.shape)}, the head expects "
                f"{tuple(own[name].shape)}"
            )
    head.load_state_dict(take, strict=False)
    return sorted(take)
