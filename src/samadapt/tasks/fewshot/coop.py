"""CoOp (Zhou et al., IJCV 2022): learned prompt context vectors in front of each class name, CLIP frozen.

The prompt "X X ... X {class}." is tokenised once; its "X" embeddings are replaced by `n_ctx` shared learned
vectors and the rest runs through open_clip's own text transformer (positional embedding, causal mask, final
norm, pooling at the end-of-text token, projection), so gradients reach only the context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import text_global_pool
from torch import nn

from samadapt.encoders.clip import ClipModel
from samadapt.errors import ConfigError


class CoOpHead(nn.Module):
    """logits = scale * f @ text(ctx, class)^T; `ctx` [n_ctx, width] is the only learned tensor."""

    def __init__(
        self,
        clip: ClipModel,
        class_names: list[str],
        *,
        n_ctx: int = 16,
        scale: float,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        model = clip.model
        if not hasattr(model, "token_embedding"):
            raise ConfigError(
                f"coop needs open_clip's built-in text tower; CLIP {clip.name} has {type(model).__name__}"
            )
        prompts = [" ".join(["X"] * n_ctx) + " " + name.replace("_", " ") + "." for name in class_names]
        tokens = clip.tokenize(prompts)
        encode = getattr(clip.tokenizer, "encode", None)  # untruncated BPE ids (open_clip's SimpleTokenizer)
        if encode is not None:
            longest = max(len(encode(p)) for p in prompts) + 2  # + start and end tokens
            if longest > tokens.shape[1]:
                raise ConfigError(
                    f"coop: {n_ctx} context tokens plus the longest class name need {longest} tokens; "
                    f"CLIP's context length is {tokens.shape[1]} (lower --coop-n-ctx)"
                )
        with torch.no_grad():
            embedded = model.token_embedding(tokens.to(model.token_embedding.weight.device)).float()
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :1], persistent=False)
        self.register_buffer("suffix", embedded[:, 1 + n_ctx :], persistent=False)
        self.ctx = nn.Parameter(torch.randn(n_ctx, embedded.shape[-1]) * init_std)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self._clip = (model,)  # a tuple keeps the frozen CLIP out of this head's state_dict
        self._cached: torch.Tensor | None = None

    def text_features(self) -> torch.Tensor:
        m = self._clip[0]
        n_classes = self.prefix.shape[0]
        x = torch.cat([self.prefix, self.ctx[None].expand(n_classes, -1, -1), self.suffix], dim=1)
        x = x + m.positional_embedding.float()
        x = m.transformer(x, attn_mask=m.attn_mask)
        x = m.ln_final(x)
        x = text_global_pool(x, self.tokens, m.text_pool_type, eos_token_id=getattr(m, "text_eos_id", None))
        proj = m.text_projection
        x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x, dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.training or self._cached is None:
            text = self.text_features()
            self._cached = None if self.training else text.detach()
        else:
            text = self._cached
        return self.scale * features @ text.T

    def train(self, mode: bool = True) -> CoOpHead:
        self._cached = None  # context changes while training
        return super().train(mode)
