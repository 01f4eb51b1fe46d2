"""3D ViT backbone with its own [CLS] token, a mask token and patch dropout at the patch embedding."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .semantic_attention import Block, cls_attention_to_s_att, resize_position_embedding, sincos_position_embedding_3d
from .swin import apply_cell_mask


class ViTBackbone(nn.Module):
    """A plain 3D ViT: cubic patches, learnable position embedding and pre-norm blocks.

    With patch 16^3 at 128^3 it has the same 8^3 = 512 tokens as the Swin's stage-3 mask grid, so each
    token is one mask cell. S_ATT is the last block's [CLS] attention (Eq. 1).

    Args:
        config: model sizes (``vit_patch_size``, ``vit_depth``, ``vit_width``, ``vit_heads``).
        grid: token grid of the pretraining crop, e.g. (8, 8, 8).
        drop_path: stochastic depth of the last block (rates grow linearly from 0 over the blocks).
    """

    def __init__(self, config: ModelConfig, grid: tuple[int, int, int], drop_path: float | None = None):
        super().__init__()
        self.config = config
        width = config.vit_width
        patch = config.vit_patch_size
        self.grid = tuple(grid)
        self.patch_embed = nn.Conv3d(config.in_channels, width, kernel_size=patch, stride=patch)
        self.position_embedding = nn.Parameter(sincos_position_embedding_3d(self.grid, width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.mask_token = nn.Parameter(torch.zeros(1, width, 1, 1, 1))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

        final_rate = config.drop_path if drop_path is None else drop_path
        rates = torch.linspace(0.0, final_rate, config.vit_depth).tolist()
        self.blocks = nn.ModuleList(Block(width, config.vit_heads, config.vit_mlp_ratio, rate) for rate in rates)
        self.norm = nn.LayerNorm(width)
        # Recompute each block in the backward pass instead of storing its activations (set by the trainer).
        self.checkpoint_activations = False

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Return the parameters counted as the backbone: all but the mask token."""
        return [parameter for name, parameter in self.named_parameters() if name != "mask_token"]

    def forward(
        self,
        images: torch.Tensor,
        cell_mask: torch.Tensor | None = None,
        patch_drop: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode a batch of crops.

        Args:
            images: (B, C, X, Y, Z), each side a multiple of the patch size.
            cell_mask: optional (B, X/p, Y/p, Z/p) bool, True where the patch embedding is replaced by
                the mask token.
            patch_drop: optional (B, X/p, Y/p, Z/p) bool, True where the patch embedding is zeroed.

        Returns:
            ``cls`` (B, D), ``patch_tokens`` (B, N, D), ``s_att`` (B, N), ``tokens`` (B, D, g_x, g_y, g_z)
            (the normalised patch tokens on their grid) and ``hidden`` (each block's output, (B, 1 + N, D)).
        """
        patches = self.patch_embed(images)
        grid = tuple(patches.shape[2:])
        if cell_mask is not None:
            patches = apply_cell_mask(patches, cell_mask, self.mask_token)
        if patch_drop is not None:
            patches = patches * (~patch_drop)[:, None].to(patches.dtype)
        patches = patches + resize_position_embedding(self.position_embedding, grid).to(patches.dtype)

        tokens = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)
        hidden, cls_attention = [], None
        recompute = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        for index, block in enumerate(self.blocks):
            is_last = index == len(self.blocks) - 1
            if recompute:
                tokens, cls_attention = checkpoint(block, tokens, is_last, use_reentrant=False)
            else:
                tokens, cls_attention = block(tokens, return_cls_attention=is_last)
            hidden.append(tokens)
        tokens = self.norm(tokens)

        patch_tokens = tokens[:, 1:]
        return {
            "cls": tokens[:, 0],
            "patch_tokens": patch_tokens,
            "s_att": cls_attention_to_s_att(cls_attention),
            "tokens": patch_tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid),
            "hidden": hidden,
        }
