"""Segmentation networks: the pretrained DAGMaN encoder with a U-Net decoder trained from scratch.

The Swin encoder gets the SwinUNETR decoder and the ViT encoder the UNETR decoder, both from MONAI.
"""

from __future__ import annotations

import torch
from monai.networks.nets.swin_unetr import SwinUNETR
from monai.networks.nets.unetr import UNETR
from torch import nn

from ..config import DAGMaNConfig, cell_voxels
from .semantic_attention import SemanticAttention
from .swin import build_swin
from .vit import ViTBackbone


class DAGMaNSegmenter(nn.Module):
    """SwinUNETR layout whose Swin encoder and SA block come from DAGMaN pretraining.

    The SA block does not feed the decoder; it only yields the attention map S_ATT shown to users.

    Args:
        config: the pretraining configuration (backbone sizes, SA block and crop size).
        num_classes: output channels including background.
        drop_path: stochastic depth of the encoder while fine-tuning.
    """

    architecture = "dagman_swin_unetr"

    def __init__(self, config: DAGMaNConfig, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        model = config.model
        self.config = config
        self.num_classes = num_classes
        self.unetr = SwinUNETR(
            in_channels=model.in_channels,
            out_channels=num_classes,
            patch_size=model.patch_size,
            depths=tuple(model.depths),
            num_heads=tuple(model.num_heads),
            window_size=model.window_size,
            feature_size=model.embed_dim,
            dropout_path_rate=drop_path,
            normalize=True,
            spatial_dims=3,
        )
        # Same module class and sizes as the pretraining backbone, so its weights load one to one.
        self.unetr.swinViT = build_swin(model, drop_path)
        self.sa_stage = model.sa_stage
        self.cell_voxels = cell_voxels(config)
        self.sa = SemanticAttention(
            dim=model.embed_dim * 2**model.sa_stage,
            grid=(config.data.crop_size // self.cell_voxels,) * 3,
            depth=model.sa_depth,
            num_heads=model.sa_heads,
            mlp_ratio=model.sa_mlp_ratio,
        )

    def load_pretrained_encoder(self, encoder_state: dict[str, torch.Tensor]) -> None:
        """Load the Swin and SA weights of a ``DAGMaNEncoder`` state dict; the decoder stays as initialised."""
        swin_state = {key[len("backbone.swin."):]: value for key, value in encoder_state.items() if key.startswith("backbone.swin.")}
        sa_state = {key[len("sa."):]: value for key, value in encoder_state.items() if key.startswith("sa.")}
        if not swin_state or not sa_state:
            raise ValueError("the pretrained state contains no 'backbone.swin.*' or 'sa.*' weights; is it a DAGMaN encoder?")
        self.unetr.swinViT.load_state_dict(swin_state)
        self.sa.load_state_dict(sa_state)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits (B, num_classes, X, Y, Z) for (B, 1, X, Y, Z) crops (sides divisible by 32)."""
        return self.forward_with_attention(images, with_attention=False)[0]

    def forward_with_attention(self, images: torch.Tensor, with_attention: bool = True):
        """Return the logits and S_ATT on the cell grid, (B, 1, X/c, Y/c, Z/c), or None without attention."""
        net = self.unetr
        hidden = net.swinViT(images, net.normalize)

        encoded0 = net.encoder1(images)
        encoded1 = net.encoder2(hidden[0])
        encoded2 = net.encoder3(hidden[1])
        encoded3 = net.encoder4(hidden[2])
        decoded4 = net.encoder10(hidden[4])
        decoded3 = net.decoder5(decoded4, hidden[3])
        decoded2 = net.decoder4(decoded3, encoded3)
        decoded1 = net.decoder3(decoded2, encoded2)
        decoded0 = net.decoder2(decoded1, encoded1)
        logits = net.out(net.decoder1(decoded0, encoded0))

        if not with_attention:
            return logits, None
        tokens = hidden[self.sa_stage]
        s_att = self.sa(tokens)["s_att"]
        return logits, s_att.reshape(tokens.shape[0], 1, *tokens.shape[2:])


class DAGMaNViTSegmenter(nn.Module):
    """UNETR layout whose ViT encoder comes from DAGMaN pretraining.

    The decoder reads the tokens after blocks d/4, d/2 and 3d/4 and the final normalised tokens (blocks
    3, 6, 9 and 12 of the 12-block ViT). S_ATT is the last block's [CLS] attention.

    Args:
        config: the pretraining configuration (``model.backbone: vit``, patch 16).
        num_classes: output channels including background.
        drop_path: stochastic depth of the encoder while fine-tuning.
    """

    architecture = "dagman_vit_unetr"

    def __init__(self, config: DAGMaNConfig, num_classes: int, drop_path: float = 0.0):
        super().__init__()
        model = config.model
        self.config = config
        self.num_classes = num_classes
        self.cell_voxels = cell_voxels(config)
        crop = config.finetune.crop_size
        self.unetr = UNETR(
            in_channels=model.in_channels,
            out_channels=num_classes,
            img_size=crop,
            hidden_size=model.vit_width,
            mlp_dim=int(model.vit_width * model.vit_mlp_ratio),
            num_heads=model.vit_heads,
            norm_name="instance",
            spatial_dims=3,
        )
        # UNETR builds its own ViT; the DAGMaN one replaces it, so that pretrained weights load one to one.
        del self.unetr.vit
        grid = (config.data.crop_size // self.cell_voxels,) * 3
        self.vit = ViTBackbone(model, grid, drop_path)
        depth = model.vit_depth
        self.skip_blocks = [min(depth * quarter // 4, depth - 1) for quarter in (1, 2, 3)]

    def load_pretrained_encoder(self, encoder_state: dict[str, torch.Tensor]) -> None:
        """Load the ViT weights of a ``DAGMaNEncoder`` state dict; the decoder stays as initialised."""
        vit_state = {key[len("backbone."):]: value for key, value in encoder_state.items() if key.startswith("backbone.")}
        if not vit_state or "cls_token" not in vit_state:
            raise ValueError("the pretrained state contains no ViT 'backbone.*' weights; was it pretrained with model.backbone vit?")
        self.vit.load_state_dict(vit_state)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits (B, num_classes, X, Y, Z) for (B, 1, X, Y, Z) crops (sides divisible by 16)."""
        return self.forward_with_attention(images, with_attention=False)[0]

    def forward_with_attention(self, images: torch.Tensor, with_attention: bool = True):
        """Return the logits and S_ATT on the patch grid, (B, 1, X/16, Y/16, Z/16), or None without attention."""
        net = self.unetr
        encoded = self.vit(images)
        grid = tuple(encoded["tokens"].shape[2:])

        def to_map(tokens: torch.Tensor) -> torch.Tensor:
            return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)

        hidden = encoded["hidden"]
        encoded1 = net.encoder1(images)
        encoded2 = net.encoder2(to_map(hidden[self.skip_blocks[0]]))
        encoded3 = net.encoder3(to_map(hidden[self.skip_blocks[1]]))
        encoded4 = net.encoder4(to_map(hidden[self.skip_blocks[2]]))
        decoded3 = net.decoder5(encoded["tokens"], encoded4)
        decoded2 = net.decoder4(decoded3, encoded3)
        decoded1 = net.decoder3(decoded2, encoded2)
        logits = net.out(net.decoder2(decoded1, encoded1))

        if not with_attention:
            return logits, None
        return logits, encoded["s_att"].reshape(images.shape[0], 1, *grid)


SEGMENTERS = {cls.architecture: cls for cls in (DAGMaNSegmenter, DAGMaNViTSegmenter)}


def build_segmenter(config: DAGMaNConfig, num_classes: int, drop_path: float = 0.0) -> nn.Module:
    """Build the segmentation network that matches ``config.model.backbone``."""
    cls = DAGMaNViTSegmenter if config.model.backbone == "vit" else DAGMaNSegmenter
    return cls(config, num_classes, drop_path)
