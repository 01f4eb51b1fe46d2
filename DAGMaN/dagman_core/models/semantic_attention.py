"""Semantic-attention (SA) block: a [CLS] token and ViT blocks over the stage-3 Swin tokens.

S_ATT (Eq. 1 of "Co-distilled attention guided masked image modeling with noisy teacher for
self-supervised learning on medical images", MIDL 2025) is the [CLS] query's softmax attention over
all N + 1 keys of the last block, averaged over heads, keeping the N patch columns without
renormalisation. It ranks the mask cells and is the attention map shown to users.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn


def sincos_position_embedding_3d(grid: tuple[int, int, int], dim: int) -> torch.Tensor:
    """Return fixed 3D sine-cosine position embeddings of shape (1, dim, g_x, g_y, g_z).

    Each axis gets ``2 * (dim // 6)`` channels (sine and cosine of geometric frequencies); the remaining
    channels are zero.
    """
    per_axis = dim // 6
    frequencies = 1.0 / (10000 ** (torch.arange(per_axis, dtype=torch.float64) / max(per_axis, 1)))
    coordinates = torch.meshgrid(*[torch.arange(size, dtype=torch.float64) for size in grid], indexing="ij")

    channels = []
    for axis_coordinates in coordinates:
        phase = axis_coordinates[None] * frequencies[:, None, None, None]
        channels.extend([torch.sin(phase), torch.cos(phase)])
    embedding = torch.cat(channels, dim=0)
    padding = dim - embedding.shape[0]
    if padding:
        embedding = torch.cat([embedding, torch.zeros(padding, *grid, dtype=torch.float64)], dim=0)
    return embedding[None].float()


class Attention(nn.Module):
    """Multi-head self-attention that can also return the [CLS] query's attention weights."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SA width {dim} is not divisible by its {num_heads} heads; pick sa_heads dividing {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: torch.Tensor, return_cls_attention: bool = False):
        """Attend over ``tokens`` (B, 1 + N, D); optionally also return the [CLS] attention (B, heads, 1 + N)."""
        batch, length, width = tokens.shape
        qkv = self.qkv(tokens).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)

        output = F.scaled_dot_product_attention(query, key, value)
        output = self.proj(output.transpose(1, 2).reshape(batch, length, width))
        if not return_cls_attention:
            return output, None

        # The [CLS] row alone, in fp32, for the ranking of mask cells.
        logits = query[:, :, :1].float() @ key.float().transpose(-2, -1) / math.sqrt(self.head_dim)
        return output, logits.softmax(dim=-1)[:, :, 0]


class Block(nn.Module):
    """Pre-norm ViT block: attention and MLP, each with a residual connection and stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attention = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, tokens: torch.Tensor, return_cls_attention: bool = False):
        attended, cls_attention = self.attention(self.norm1(tokens), return_cls_attention)
        tokens = tokens + self.drop_path(attended)
        tokens = tokens + self.drop_path(self.mlp(self.norm2(tokens)))
        return tokens, cls_attention


def resize_position_embedding(embedding: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Return ``embedding`` (1, D, g_x, g_y, g_z), trilinearly resized to ``grid`` when that differs."""
    if tuple(grid) == tuple(embedding.shape[2:]):
        return embedding
    return F.interpolate(embedding, size=tuple(grid), mode="trilinear", align_corners=False)


def cls_attention_to_s_att(cls_attention: torch.Tensor) -> torch.Tensor:
    """Eq. 1: average the [CLS] attention (B, heads, 1 + N) over heads and drop the [CLS] column.

    The remaining N patch columns are not renormalised, so each row sums to at most 1.
    """
    return cls_attention.mean(dim=1)[:, 1:]


class SemanticAttention(nn.Module):
    """[CLS] token, learnable 3D position embedding and ViT blocks over a grid of Swin tokens.

    Args:
        dim: token width (384 at stage 3 for embed 48).
        grid: token grid of the pretraining crop, e.g. (8, 8, 8) for 128^3 at stage 3.
        depth: number of ViT blocks.
        num_heads: attention heads per block.
        mlp_ratio: MLP hidden width over ``dim``.
    """

    def __init__(self, dim: int, grid: tuple[int, int, int], depth: int = 2, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.grid = tuple(grid)
        self.position_embedding = nn.Parameter(sincos_position_embedding_3d(self.grid, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)

    def position_embedding_for(self, grid: tuple[int, int, int]) -> torch.Tensor:
        """Return the position embedding (1, D, g_x, g_y, g_z), trilinearly resized when ``grid`` differs."""
        return resize_position_embedding(self.position_embedding, grid)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the SA block on a stage output.

        Args:
            features: (B, D, g_x, g_y, g_z) stage-3 tokens.

        Returns:
            ``cls`` (B, D), ``patch_tokens`` (B, N, D) with N = g_x g_y g_z in (x, y, z) raster order,
            and ``s_att`` (B, N) in [0, 1], each row summing to at most 1.
        """
        grid = tuple(features.shape[2:])
        features = features + self.position_embedding_for(grid).to(features.dtype)
        tokens = features.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)

        cls_attention = None
        for index, block in enumerate(self.blocks):
            is_last = index == len(self.blocks) - 1
            tokens, cls_attention = block(tokens, return_cls_attention=is_last)
        tokens = self.norm(tokens)

        return {"cls": tokens[:, 0], "patch_tokens": tokens[:, 1:], "s_att": cls_attention_to_s_att(cls_attention)}
