"""Projection heads of the co-distillation losses and the AMIP reconstruction head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP ``in -> hidden -> hidden -> bottleneck``, L2 normalisation, then a weight-normalised layer to K.

    The last layer's weight norm (its gain) is fixed to 1, as in DINO, so only the direction of each
    prototype is learned.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map (..., in_dim) tokens to (..., K) logits."""
        bottleneck = F.normalize(self.mlp(tokens), dim=-1, p=2)
        return self.last_layer(bottleneck)


class ReconstructionHead(nn.Module):
    """AMIP head: one 1x1x1 linear layer from each stage-4 token to the voxels it covers.

    The token's ``scale^3`` outputs are laid out by pixel shuffle, so the output has the crop's size.
    """

    def __init__(self, in_dim: int, scale: int, out_channels: int = 1):
        super().__init__()
        self.scale = scale
        self.out_channels = out_channels
        self.projection = nn.Conv3d(in_dim, out_channels * scale**3, kernel_size=1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map (B, D, g_x, g_y, g_z) stage-4 tokens to a (B, C, g_x s, g_y s, g_z s) reconstruction."""
        batch, _, size_x, size_y, size_z = tokens.shape
        scale = self.scale
        voxels = self.projection(tokens)
        voxels = voxels.reshape(batch, self.out_channels, scale, scale, scale, size_x, size_y, size_z)
        voxels = voxels.permute(0, 1, 5, 2, 6, 3, 7, 4)
        return voxels.reshape(batch, self.out_channels, size_x * scale, size_y * scale, size_z * scale)
