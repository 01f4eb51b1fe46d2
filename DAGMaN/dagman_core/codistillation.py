"""One DAGMaN co-distillation step: noisy EMA teacher, attention-guided masking and the four losses."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from .config import DAGMaNConfig
from .losses import Centers, distillation_cross_entropy, masked_l1, masked_patch_mean
from .masking import attention_guided_mask, cells_to_voxels, patch_dropout
from .models.encoder import DAGMaNEncoder, stage_stride
from .models.heads import DINOHead, ReconstructionHead


class Student(nn.Module):
    """Encoder with the DINO heads of AITD ([CLS]), AMPD (patch tokens), GITD (pooled stage 4) and the AMIP head."""

    def __init__(self, config: DAGMaNConfig, drop_path: float | None = None):
        super().__init__()
        loss = config.loss
        self.encoder = DAGMaNEncoder(config, drop_path)
        channels = self.encoder.backbone.stage_channels
        sa_width = channels[config.model.sa_stage]

        def head(in_dim: int) -> DINOHead:
            return DINOHead(in_dim, loss.out_dim, loss.head_hidden_dim, loss.head_bottleneck_dim)

        self.cls_head = head(sa_width)
        self.patch_head = head(sa_width)
        self.global_head = head(channels[4])
        self.reconstruction_head = ReconstructionHead(channels[4], scale=stage_stride(config, 4))

    def last_layers(self) -> list[nn.Parameter]:
        """Return the last-layer weights of the DINO heads (frozen during the first epoch)."""
        return [
            parameter
            for head in (self.cls_head, self.patch_head, self.global_head)
            for parameter in head.last_layer.parameters()
            if parameter.requires_grad
        ]


@dataclass
class StepOutput:
    """Losses of one step (scalars) and the masks used, for logging."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    masked_fraction: float
    teacher_entropy: float


class CoDistillation(nn.Module):
    """Student, EMA teacher and centers of DAGMaN pretraining.

    The teacher starts as a copy of the student (without stochastic depth), runs in eval mode without
    gradients and is updated only by ``update_teacher``.
    """

    def __init__(self, config: DAGMaNConfig):
        super().__init__()
        self.config = config
        self.student = Student(config)
        self.teacher = Student(config, drop_path=0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad = False
        self.centers = Centers(config.loss.out_dim, config.loss.center_momentum)
        self.cell_voxels = self.student.encoder.cell_voxels

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """Move every teacher parameter towards the student's: ``t = m t + (1 - m) s``."""
        student_parameters = list(self.student.parameters())
        teacher_parameters = list(self.teacher.parameters())
        torch._foreach_mul_(teacher_parameters, momentum)
        torch._foreach_add_(teacher_parameters, [p.detach() for p in student_parameters], alpha=1.0 - momentum)

    def _teacher_pass(self, view: torch.Tensor, generator: torch.Generator | None) -> dict:
        masking = self.config.masking
        patch_drop = None
        if masking.noisy_teacher:
            patch_grid = tuple(size // self.config.model.patch_size for size in view.shape[2:])
            patch_drop = patch_dropout(view.shape[0], patch_grid, masking.teacher_dropout_ratio, view.device, generator)
        with torch.no_grad():
            encoded = self.teacher.encoder(view, patch_drop=patch_drop)
            return {
                "s_att": encoded["s_att"],
                "cls": self.teacher.cls_head(encoded["cls"]),
                "patch": self.teacher.patch_head(encoded["patch_tokens"]),
                "global": self.teacher.global_head(encoded["global_tokens"]),
            }

    def _student_pass(self, view: torch.Tensor, cell_mask: torch.Tensor) -> dict:
        encoded = self.student.encoder(view, cell_mask=cell_mask)
        return {
            "cls": self.student.cls_head(encoded["cls"]),
            "patch": self.student.patch_head(encoded["patch_tokens"]),
            "global": self.student.global_head(encoded["global_tokens"]),
            "reconstruction": self.student.reconstruction_head(encoded["stages"][4]),
        }

    def forward(
        self, view_u: torch.Tensor, view_v: torch.Tensor, teacher_temperature: float, generator: torch.Generator | None = None
    ) -> StepOutput:
        """Compute the DAGMaN loss for two views of the same CTs.

        Args:
            view_u, view_v: (B, 1, X, Y, Z) random crops of the same volumes, scaled to [0, 1].
            teacher_temperature: the teacher's sharpening temperature at this step.
            generator: CPU random generator for patch dropout, tie-breaking and hints.
        """
        config = self.config
        views = (view_u, view_v)
        teacher = [self._teacher_pass(view, generator) for view in views]

        cells = tuple(size // self.cell_voxels for size in view_u.shape[2:])
        masks = []
        for output in teacher:
            flat_mask = attention_guided_mask(
                output["s_att"], config.masking.ratio, config.masking.hint_ratio, config.masking.hints, generator
            )
            masks.append(flat_mask.reshape(flat_mask.shape[0], *cells))
        student = [self._student_pass(view, mask) for view, mask in zip(views, masks)]

        def cross_entropy(name: str, teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
            return distillation_cross_entropy(
                teacher_logits,
                student_logits,
                getattr(self.centers, name),
                teacher_temperature,
                config.loss.student_temperature,
            )

        # AITD and GITD pair each student view with the teacher's other view; AMPD pairs the same view.
        aitd = 0.5 * sum(cross_entropy("cls", teacher[1 - i]["cls"], student[i]["cls"]).mean() for i in (0, 1))
        gitd = 0.5 * sum(cross_entropy("global", teacher[1 - i]["global"], student[i]["global"]).mean() for i in (0, 1))
        ampd = 0.5 * sum(
            masked_patch_mean(cross_entropy("patch", teacher[i]["patch"], student[i]["patch"]), masks[i].flatten(1))
            for i in (0, 1)
        )
        amip = 0.5 * sum(
            masked_l1(student[i]["reconstruction"], views[i], cells_to_voxels(masks[i], self.cell_voxels)) for i in (0, 1)
        )

        weights = config.loss
        total = (
            weights.amip_weight * amip + weights.ampd_weight * ampd + weights.aitd_weight * aitd + weights.gitd_weight * gitd
        )

        for name in ("cls", "patch", "global"):
            self.centers.update(name, torch.cat([output[name].flatten(0, -2) for output in teacher]))

        probabilities = torch.softmax(teacher[0]["cls"].float() / teacher_temperature, dim=-1)
        entropy = -(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1).mean()
        return StepOutput(
            total=total,
            terms={"amip": amip.detach(), "ampd": ampd.detach(), "aitd": aitd.detach(), "gitd": gitd.detach()},
            masked_fraction=float(torch.stack(masks).float().mean()),
            teacher_entropy=float(entropy),
        )

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the teacher encoder's weights, which DINO-style methods keep as the pretrained model."""
        return copy.deepcopy(self.teacher.encoder.state_dict())
