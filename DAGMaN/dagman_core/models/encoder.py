"""The DAGMaN encoder: Swin backbone plus the semantic-attention block at stage 3."""

from __future__ import annotations

import torch
from torch import nn

from ..config import DAGMaNConfig
from .semantic_attention import SemanticAttention
from .swin import SwinBackbone


def stage_stride(config: DAGMaNConfig, stage: int) -> int:
    """Return the voxels per token side at ``stage`` (0 = patch embedding): patch size times 2^stage."""
    return config.model.patch_size * 2**stage


class DAGMaNEncoder(nn.Module):
    """Swin backbone and SA block; the part of the model shared by pretraining, fine-tuning and inference.

    Args:
        config: the run's configuration.
        drop_path: stochastic depth rate of the Swin stages (0 for the EMA teacher and at inference).
    """

    def __init__(self, config: DAGMaNConfig, drop_path: float | None = None):
        super().__init__()
        self.config = config
        model = config.model
        self.backbone = SwinBackbone(model, drop_path)
        self.sa_stage = model.sa_stage
        self.cell_voxels = stage_stride(config, model.sa_stage)
        grid = (config.data.crop_size // self.cell_voxels,) * 3
        self.sa = SemanticAttention(
            dim=self.backbone.stage_channels[model.sa_stage],
            grid=grid,
            depth=model.sa_depth,
            num_heads=model.sa_heads,
            mlp_ratio=model.sa_mlp_ratio,
        )

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
            patch_drop: optional (B, X/p, Y/p, Z/p) bool patch dropout.

        Returns:
            ``stages`` (the five Swin outputs), ``cls`` (B, D_3), ``patch_tokens`` (B, N, D_3),
            ``s_att`` (B, N) and ``global_tokens`` (B, D_4), the average-pooled stage-4 tokens.
        """
        stages = self.backbone(images, cell_mask=cell_mask, patch_drop=patch_drop)
        semantic = self.sa(stages[self.sa_stage])
        return {
            "stages": stages,
            "cls": semantic["cls"],
            "patch_tokens": semantic["patch_tokens"],
            "s_att": semantic["s_att"],
            "global_tokens": stages[4].mean(dim=(2, 3, 4)),
        }
