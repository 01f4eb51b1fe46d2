"""The DAGMaN encoder: a Swin backbone with the semantic-attention block, or a ViT with its own [CLS]."""

from __future__ import annotations

import torch
from torch import nn

from ..config import DAGMaNConfig, cell_voxels
from .semantic_attention import SemanticAttention
from .swin import SwinBackbone
from .vit import ViTBackbone


def stage_stride(config: DAGMaNConfig, stage: int) -> int:
    """Return the voxels per token side at Swin ``stage`` (0 = patch embedding): patch size times 2^stage."""
    return config.model.patch_size * 2**stage


class DAGMaNEncoder(nn.Module):
    """The part of the model shared by pretraining, fine-tuning and inference.

    On Swin, the stage output at ``model.sa_stage`` feeds the SA block. Its [CLS] and patch tokens feed
    AITD and AMPD, the pooled stage-4 tokens feed GITD and the stage-4 map feeds AMIP. On ViT, the last
    block's [CLS], its patch tokens, their mean and their map play the same four parts.

    Args:
        config: the run's configuration.
        drop_path: stochastic depth rate (0 for the EMA teacher and at inference).
    """

    def __init__(self, config: DAGMaNConfig, drop_path: float | None = None):
        super().__init__()
        self.config = config
        model = config.model
        self.is_vit = model.backbone == "vit"
        self.cell_voxels = cell_voxels(config)
        grid = (config.data.crop_size // self.cell_voxels,) * 3

        if self.is_vit:
            self.backbone = ViTBackbone(model, grid, drop_path)
            self.sa = None
            self.token_width = self.global_width = model.vit_width
            self.patch_voxels = self.deep_stride = model.vit_patch_size
        else:
            self.backbone = SwinBackbone(model, drop_path)
            channels = self.backbone.stage_channels
            self.sa_stage = model.sa_stage
            self.sa = SemanticAttention(
                dim=channels[model.sa_stage],
                grid=grid,
                depth=model.sa_depth,
                num_heads=model.sa_heads,
                mlp_ratio=model.sa_mlp_ratio,
            )
            self.token_width, self.global_width = channels[model.sa_stage], channels[4]
            self.patch_voxels = model.patch_size
            self.deep_stride = stage_stride(config, 4)

    def forward(
        self,
        images: torch.Tensor,
        cell_mask: torch.Tensor | None = None,
        patch_drop: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor]]:
        """Encode a batch of crops.

        Args:
            images: (B, 1, X, Y, Z) crops scaled to [0, 1].
            cell_mask: optional (B, X/c, Y/c, Z/c) bool mask of cells (c = ``cell_voxels``).
            patch_drop: optional (B, X/p, Y/p, Z/p) bool patch dropout (p = ``patch_voxels``).

        Returns:
            ``cls`` (B, D), ``patch_tokens`` (B, N, D), ``s_att`` (B, N), ``global_tokens`` (B, D_g)
            (average-pooled deepest tokens) and ``deep_tokens`` (B, D_g, g_x, g_y, g_z), the deepest token
            map that AMIP reconstructs from. Swin adds ``stages`` (its five outputs), ViT ``hidden``.
        """
        if self.is_vit:
            encoded = self.backbone(images, cell_mask=cell_mask, patch_drop=patch_drop)
            deep = encoded["tokens"]
            return {**encoded, "global_tokens": encoded["patch_tokens"].mean(dim=1), "deep_tokens": deep}

        stages = self.backbone(images, cell_mask=cell_mask, patch_drop=patch_drop)
        semantic = self.sa(stages[self.sa_stage])
        return {
            "stages": stages,
            "cls": semantic["cls"],
            "patch_tokens": semantic["patch_tokens"],
            "s_att": semantic["s_att"],
            "global_tokens": stages[4].mean(dim=(2, 3, 4)),
            "deep_tokens": stages[4],
        }

    @torch.no_grad()
    def attention(self, images: torch.Tensor, patch_drop: torch.Tensor | None = None) -> torch.Tensor:
        """Return S_ATT (B, N) of a no-gradient pass that stops at the SA block (the whole ViT)."""
        if self.is_vit:
            return self.backbone(images, patch_drop=patch_drop)["s_att"]
        stages = self.backbone(images, patch_drop=patch_drop, last_stage=self.sa_stage)
        return self.sa(stages[self.sa_stage])["s_att"]
