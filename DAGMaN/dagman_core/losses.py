"""Co-distillation losses: AITD, AMPD, GITD (DINO/iBOT cross-entropy with centering) and AMIP (L1)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def distillation_cross_entropy(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    center: torch.Tensor,
    teacher_temperature: float,
    student_temperature: float,
) -> torch.Tensor:
    """Return the per-token cross-entropy between the centred, sharpened teacher and the student.

    Args:
        teacher_logits: (..., K) teacher head outputs (no gradient).
        student_logits: (..., K) student head outputs.
        center: (K,) running mean of the teacher's logits.

    Returns:
        (...) cross-entropy, ``-sum_k p_t log p_s``; ln K when both distributions are uniform.
    """
    teacher_probabilities = F.softmax((teacher_logits.float() - center) / teacher_temperature, dim=-1)
    student_log_probabilities = F.log_softmax(student_logits.float() / student_temperature, dim=-1)
    return -(teacher_probabilities * student_log_probabilities).sum(dim=-1)


def masked_patch_mean(per_cell: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
    """Average a (B, N) per-cell loss over the masked cells of each image, then over images."""
    weights = cell_mask.float()
    per_image = (per_cell * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    return per_image.mean()


def masked_l1(prediction: torch.Tensor, target: torch.Tensor, voxel_mask: torch.Tensor) -> torch.Tensor:
    """Return the AMIP loss: L1 over masked voxels only, ``sum |p - t| m / (sum m + 1e-5)``.

    Args:
        prediction, target: (B, 1, X, Y, Z) reconstructed and original crop.
        voxel_mask: (B, 1, X, Y, Z), 1 on the voxels of masked cells.
    """
    error = (prediction.float() - target.float()).abs() * voxel_mask
    return error.sum() / (voxel_mask.sum() + 1e-5)


class Centers(nn.Module):
    """The three teacher centers (cls, patch, global), updated as an EMA of the teacher's mean logits."""

    NAMES = ("cls", "patch", "global")

    def __init__(self, out_dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        for name in self.NAMES:
            self.register_buffer(name, torch.zeros(out_dim))

    @torch.no_grad()
    def update(self, name: str, teacher_logits: torch.Tensor) -> None:
        """Move center ``name`` towards the mean of ``teacher_logits`` (..., K) over all tokens and ranks."""
        logits = teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1])
        total = logits.sum(dim=0)
        count = torch.tensor(float(logits.shape[0]), device=logits.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            dist.all_reduce(count)
        center = getattr(self, name)
        center.mul_(self.momentum).add_(total / count, alpha=1.0 - self.momentum)
