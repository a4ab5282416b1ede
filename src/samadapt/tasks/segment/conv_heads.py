"""The AutoSAM paper's convolutional heads on the [B, 256, h, w] embedding, both with output at 4x the grid.

- `CnnHead` ("CNN"): 1x1 convs 256 -> 1024 -> 1024, 3x3 conv blocks narrowing 1024 -> 512 -> 256, two blocks that
  end in a 2x transposed conv (256 -> 128 -> 64), a 3x3 conv and a 1x1 conv to the classes; ReLU, no
  normalisation: 20.7 M parameters (the original's `SegDecoderCNN(num_depth=4)`).
- `LinearHead` ("linear"): SAM's upscaling path (two 2x transposed convs with LayerNorm2d and GELU, the decoder's
  `output_upscaling`, initialised from the checkpoint) then two 1x1 convs: about 75 K parameters. The original
  put a ReLU on the output logits, which stops a class's logits from going below 0; we leave it out.
"""

from __future__ import annotations

from torch import Tensor, nn

from samadapt.tasks.segment.transformer import sam_upscaling


def _conv_relu(cin: int, cout: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, padding=kernel // 2), nn.ReLU(inplace=True)]


class CnnHead(nn.Module):
    def __init__(
        self, *, num_classes: int, embed_dim: int = 256, top_channels: int = 64, depth: int = 4
    ) -> None:
        """Widest width is top_channels * 2**depth (1024); the last two blocks upsample 2x each."""
        super().__init__()
        width = top_channels * 2**depth
        self.input_block = nn.Sequential(*_conv_relu(embed_dim, width, 1), *_conv_relu(width, width, 1))
        blocks = []
        for i in range(depth):
            c = top_channels * 2 ** (depth - i)
            if i < depth - 2:  # narrowing blocks at the embedding resolution
                blocks.append(nn.Sequential(*_conv_relu(c, c, 3), *_conv_relu(c, c // 2, 3)))
            else:  # upsampling blocks
                blocks.append(
                    nn.Sequential(
                        *_conv_relu(c, c, 3), *_conv_relu(c, c, 3), nn.ConvTranspose2d(c, c // 2, 2, 2)
                    )
                )
        self.blocks = nn.ModuleList(blocks)
        self.final = nn.Sequential(
            nn.Conv2d(top_channels, top_channels, 3, padding=1), nn.Conv2d(top_channels, num_classes, 1)
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        x = self.input_block(embeddings)
        for block in self.blocks:
            x = block(x)
        return self.final(x)


class LinearHead(nn.Module):
    def __init__(self, *, num_classes: int, embed_dim: int = 256) -> None:
        super().__init__()
        self.output_upscaling = sam_upscaling(embed_dim)
        self.final = nn.Sequential(
            nn.Conv2d(embed_dim // 8, embed_dim // 8, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(embed_dim // 8, num_classes, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.final(self.output_upscaling(embeddings))
