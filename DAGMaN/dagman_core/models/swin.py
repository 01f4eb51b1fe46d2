"""3D Swin backbone (MONAI semantics) with a mask token and patch dropout at the patch embedding."""

from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from ..config import ModelConfig


def build_swin(config: ModelConfig, drop_path: float | None = None) -> SwinTransformer:
    """Build MONAI's 3D ``SwinTransformer`` with the sizes of ``config`` (patch_norm off)."""
    return SwinTransformer(
        in_chans=config.in_channels,
        embed_dim=config.embed_dim,
        window_size=(config.window_size,) * 3,
        patch_size=(config.patch_size,) * 3,
        depths=tuple(config.depths),
        num_heads=tuple(config.num_heads),
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=config.drop_path if drop_path is None else drop_path,
        norm_layer=nn.LayerNorm,
        patch_norm=False,
        spatial_dims=3,
    )


def apply_cell_mask(patches: torch.Tensor, cell_mask: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Replace the patch embeddings of masked cells by the mask token.

    Args:
        patches: (B, D, p_x, p_y, p_z) patch embeddings.
        cell_mask: (B, n_x, n_y, n_z) bool, True for masked cells; each cell covers (p_x / n_x)^3 patches.
        mask_token: (1, D, 1, 1, 1) learnable embedding.
    """
    factor = patches.shape[-1] // cell_mask.shape[-1]
    voxel_mask = cell_mask[:, None].to(patches.dtype)
    for axis in (2, 3, 4):
        voxel_mask = voxel_mask.repeat_interleave(factor, dim=axis)
    return patches * (1.0 - voxel_mask) + mask_token.to(patches.dtype) * voxel_mask


class SwinBackbone(nn.Module):
    """MONAI's Swin transformer, with masking and patch dropout applied right after patch embedding.

    The stage outputs follow MONAI. Index 0 is the patch embedding (``embed_dim`` channels at 1/2
    resolution for patch 2). Indices 1-4 are the outputs of stages 1-4 after patch merging, each with
    twice the channels and half the resolution of the one before. At 128^3 with embed 48 that is 64^3 x 48,
    32^3 x 96, 16^3 x 192, 8^3 x 384 (stage 3) and 4^3 x 768 (stage 4).
    """

    def __init__(self, config: ModelConfig, drop_path: float | None = None):
        super().__init__()
        self.config = config
        self.swin = build_swin(config, drop_path)
        self.mask_token = nn.Parameter(torch.zeros(1, config.embed_dim, 1, 1, 1))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    @property
    def stage_channels(self) -> list[int]:
        """Channels of the five outputs: patch embedding, then stages 1-4."""
        return [self.config.embed_dim * 2**index for index in range(5)]

    @property
    def checkpoint_activations(self) -> bool:
        """Whether the Swin blocks recompute their activations in the backward pass instead of storing them.

        MONAI's blocks checkpoint their attention and MLP parts separately, so the backward pass holds
        the activations of one part at a time, not those of a whole stage.
        """
        return all(block.use_checkpoint for block in self._blocks())

    @checkpoint_activations.setter
    def checkpoint_activations(self, enabled: bool) -> None:
        for block in self._blocks():
            block.use_checkpoint = enabled

    def _blocks(self) -> list[nn.Module]:
        swin = self.swin
        return [block for layer in (swin.layers1, swin.layers2, swin.layers3, swin.layers4) for block in layer[0].blocks]

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Return the parameters counted as the backbone: the patch embedding and the four stages."""
        return list(self.swin.parameters())

    def forward(
        self,
        images: torch.Tensor,
        cell_mask: torch.Tensor | None = None,
        patch_drop: torch.Tensor | None = None,
        last_stage: int = 4,
    ) -> list[torch.Tensor]:
        """Run the Swin stages.

        Args:
            images: (B, C, X, Y, Z) crops, each side divisible by 32.
            cell_mask: optional (B, n_x, n_y, n_z) bool, True where a mask cell is replaced by the mask
                token. Each cell covers a block of patch embeddings (8^3 of them for patch 2 and stage 3).
            patch_drop: optional (B, X/p, Y/p, Z/p) bool, True where a patch embedding is zeroed
                (the noisy teacher's patch dropout).
            last_stage: stop after this stage (a ranking pass needs only the stages up to the SA block).

        Returns:
            Layer-normalised feature maps (B, C_s, X_s, Y_s, Z_s): patch embedding, then stages 1 to
            ``last_stage`` (five maps by default).
        """
        swin = self.swin
        patches = swin.pos_drop(swin.patch_embed(images))

        if cell_mask is not None:
            patches = apply_cell_mask(patches, cell_mask, self.mask_token)

        if patch_drop is not None:
            patches = patches * (~patch_drop)[:, None].to(patches.dtype)

        outputs = [swin.proj_out(patches, True)]
        hidden = patches
        for layer in (swin.layers1, swin.layers2, swin.layers3, swin.layers4)[:last_stage]:
            hidden = layer[0](hidden.contiguous())
            outputs.append(swin.proj_out(hidden, True))
        return outputs
