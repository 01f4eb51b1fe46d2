"""Classification networks: the pretrained DAGMaN encoder with one linear layer on a pooled feature.

Linear probing trains the linear layer alone on frozen features, standardised with the training
set's per-feature mean and standard deviation. Full fine-tuning trains every layer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import DAGMaNConfig
from .encoder import DAGMaNEncoder

POOLINGS = ("cls", "stage4")


class DAGMaNClassifier(nn.Module):
    """DAGMaN encoder, feature standardisation and one linear layer.

    Args:
        config: the pretraining configuration (backbone sizes, SA block and crop size).
        num_classes: number of classes (at least 2).
        pooling: ``cls`` reads the SA block's [CLS] token (the ViT's own [CLS]); ``stage4`` the
            average-pooled deepest tokens (the ViT's mean patch token).
        drop_path: stochastic depth of the encoder while fine-tuning.
    """

    architecture = "dagman_classifier"

    def __init__(self, config: DAGMaNConfig, num_classes: int, pooling: str = "cls", drop_path: float = 0.0):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"invalid pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        self.config = config
        self.num_classes = num_classes
        self.pooling = pooling
        self.encoder = DAGMaNEncoder(config, drop_path)
        self.cell_voxels = self.encoder.cell_voxels
        width = self.encoder.token_width if pooling == "cls" else self.encoder.global_width
        self.register_buffer("feature_mean", torch.zeros(width))
        self.register_buffer("feature_std", torch.ones(width))
        self.head = nn.Linear(width, num_classes)

    @property
    def feature_width(self) -> int:
        return self.head.in_features

    def load_pretrained_encoder(self, encoder_state: dict[str, torch.Tensor]) -> None:
        """Load the weights of a pretraining run's ``DAGMaNEncoder`` (``encoder.safetensors``)."""
        self.encoder.load_state_dict(encoder_state)

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the pooled features (B, D) and S_ATT on the cell grid (B, 1, X/c, Y/c, Z/c)."""
        encoded = self.encoder(images)
        features = encoded["cls"] if self.pooling == "cls" else encoded["global_tokens"]
        grid = [size // self.cell_voxels for size in images.shape[2:]]
        return features, encoded["s_att"].reshape(images.shape[0], 1, *grid)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Return class logits (B, C) of pooled features (B, D)."""
        return self.head((features - self.feature_mean) / self.feature_std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return class logits (B, C) for (B, 1, X, Y, Z) crops scaled to [0, 1]."""
        return self.forward_with_attention(images)[0]

    def forward_with_attention(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return class logits (B, C) and S_ATT on the cell grid (B, 1, X/c, Y/c, Z/c)."""
        features, s_att = self.encode(images)
        return self.classify_features(features), s_att


CLASSIFIERS = {DAGMaNClassifier.architecture: DAGMaNClassifier}
