"""One co-distillation step of DAGMaN or one of its baselines: teacher, masking and the four losses."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import DAGMaNConfig, mask_grid_tokens
from .losses import Centers, distillation_cross_entropy, masked_l1, masked_patch_mean
from .masking import (
    attention_guided_mask,
    attention_high_mask,
    attention_low_mask,
    block_mask,
    cell_dropout,
    cells_to_voxels,
    patch_dropout,
    random_mask,
)
from .models.encoder import DAGMaNEncoder
from .models.heads import DINOHead, ReconstructionHead

# One CPU generator for the batch, one per image, or None for torch's global generator.
Generators = torch.Generator | list[torch.Generator] | None

# The DINO head each distillation term reads, and the loss switch that needs it.
HEAD_ROLES = {"cls": "aitd", "patch": "ampd", "global": "gitd"}


class Student(nn.Module):
    """Encoder, the DINO heads of the enabled distillation terms and, with AMIP, the reconstruction head.

    AITD reads the [CLS] head, AMPD the patch head and GITD the global head. With ``loss.heads: shared``
    tokens of one width share a head; ``head_names`` maps each role to the module in ``heads``.
    """

    def __init__(self, config: DAGMaNConfig, drop_path: float | None = None):
        super().__init__()
        loss = config.loss
        self.encoder = DAGMaNEncoder(config, drop_path)
        widths = {"cls": self.encoder.token_width, "patch": self.encoder.token_width, "global": self.encoder.global_width}

        self.head_names: dict[str, str] = {}
        self.heads = nn.ModuleDict()
        for role, term in HEAD_ROLES.items():
            if not getattr(loss, term):
                continue
            name = role
            if loss.heads == "shared":
                name = "shared" if widths[role] == self.encoder.token_width else f"shared_{widths[role]}"
            if name not in self.heads:
                self.heads[name] = DINOHead(widths[role], loss.out_dim, loss.head_hidden_dim, loss.head_bottleneck_dim)
            self.head_names[role] = name
        self.reconstruction_head = (
            ReconstructionHead(self.encoder.global_width, scale=self.encoder.deep_stride) if loss.amip else None
        )

    def head(self, role: str) -> DINOHead:
        """Return the DINO head of ``role`` (``cls``, ``patch`` or ``global``)."""
        return self.heads[self.head_names[role]]

    def last_layers(self) -> list[nn.Parameter]:
        """Return the last-layer weights of the DINO heads (frozen during the first epoch)."""
        return [
            parameter
            for head in self.heads.values()
            for parameter in head.last_layer.parameters()
            if parameter.requires_grad
        ]


def parameter_counts(config: DAGMaNConfig) -> dict[str, int]:
    """Count the parameters of the student that ``config`` builds.

    ``backbone`` counts the patch embedding and the Swin stages, without the mask token. For ViT it
    counts the patch embedding, position embedding, [CLS], blocks and final norm. ``sa_block`` is the
    Swin's SA block (0 for ViT). ``heads`` counts the DINO heads with their fixed weight-norm gains, and
    ``total`` every parameter of the student.
    """
    student = Student(config)

    def count(parameters) -> int:
        return sum(parameter.numel() for parameter in parameters)

    encoder = student.encoder
    return {
        "backbone": count(encoder.backbone.backbone_parameters()),
        "sa_block": count(encoder.sa.parameters()) if encoder.sa is not None else 0,
        "heads": count(student.heads.parameters()),
        "reconstruction_head": count(student.reconstruction_head.parameters()) if student.reconstruction_head else 0,
        "total": count(student.parameters()),
    }


@dataclass
class StepOutput:
    """Losses of one step (scalars), the masks' statistics and the collapse watch.

    ``teacher_entropy`` is the mean entropy of the teacher's centred, sharpened [CLS] distribution (the
    first enabled head when AITD is off) and ``teacher_kl_uniform`` its KL divergence to the uniform
    distribution, ln K - entropy. Entropy near ln K means a uniform teacher; KL near ln K a one-hot one.
    Both are NaN when no distillation term is on. ``center_logits`` contains the teacher's logits per
    role, (tokens, K), for ``CoDistillation.update_centers``.
    """

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
    masked_fraction: float
    teacher_entropy: float
    teacher_kl_uniform: float
    center_logits: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class PreparedViews:
    """The no-grad half of one step, which both student views read.

    ``views`` contains the two crops (B, 1, X, Y, Z); ``targets`` the teacher's head outputs per view by
    role and its ``s_att`` (B, N), or None per view when no distillation term is on; ``masks`` the
    student's (B, n_x, n_y, n_z) cell mask per view.
    """

    views: tuple[torch.Tensor, torch.Tensor]
    targets: list[dict | None]
    masks: list[torch.Tensor]
    temperature: float


class CoDistillation(nn.Module):
    """Student, EMA teacher and centers of DAGMaN pretraining and of its baselines and ablations.

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
        self.num_cells = mask_grid_tokens(config)

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

    def _teacher_dropout(self, view: torch.Tensor, generator: Generators) -> torch.Tensor | None:
        """Draw the noisy teacher's dropout of one view, (B, X/p, Y/p, Z/p) bool, or None for a clean teacher."""
        masking = self.config.masking
        if not masking.noisy_teacher:
            return None
        if isinstance(generator, (list, tuple)):
            return torch.cat([self._teacher_dropout(view[row : row + 1], generator[row]) for row in range(view.shape[0])])
        encoder = self.teacher.encoder
        patch_grid = tuple(size // encoder.patch_voxels for size in view.shape[2:])
        if masking.teacher_dropout_grid == "cell":
            cell_grid = tuple(size // self.cell_voxels for size in view.shape[2:])
            return cell_dropout(view.shape[0], cell_grid, patch_grid, masking.teacher_dropout_ratio, view.device, generator)
        return patch_dropout(view.shape[0], patch_grid, masking.teacher_dropout_ratio, view.device, generator)

    @torch.no_grad()
    def _teacher_pass(self, view: torch.Tensor, patch_drop: torch.Tensor | None) -> dict:
        encoded = self.teacher.encoder(view, patch_drop=patch_drop)
        targets = {"s_att": encoded["s_att"]}
        for role, token_key in (("cls", "cls"), ("patch", "patch_tokens"), ("global", "global_tokens")):
            if role in self.teacher.head_names:
                targets[role] = self.teacher.head(role)(encoded[token_key])
        return targets

    def _student_pass(self, view: torch.Tensor, cell_mask: torch.Tensor) -> dict:
        student = self.student
        encoded = student.encoder(view, cell_mask=cell_mask)
        outputs = {}
        for role, token_key in (("cls", "cls"), ("patch", "patch_tokens"), ("global", "global_tokens")):
            if role in student.head_names:
                outputs[role] = student.head(role)(encoded[token_key])
        if student.reconstruction_head is not None:
            outputs["reconstruction"] = student.reconstruction_head(encoded["deep_tokens"])
        return outputs

    def _ranking_scores(self, view: torch.Tensor, teacher: dict | None, patch_drop: torch.Tensor | None) -> torch.Tensor:
        """Return the S_ATT (B, N) that ranks the cells of one view for the attention-based modes."""
        source = self.config.masking.attention_source
        if source == "student":
            return self.student.encoder.attention(view)
        if source == "clean_teacher":
            if teacher is not None and patch_drop is None:
                return teacher["s_att"]
            return self.teacher.encoder.attention(view)
        if teacher is not None:
            return teacher["s_att"]
        return self.teacher.encoder.attention(view, patch_drop=patch_drop)

    def make_mask(self, view: torch.Tensor, scores: torch.Tensor | None, generator: Generators) -> torch.Tensor:
        """Return the student's cell mask of one view, (B, n_x, n_y, n_z) bool, by ``masking.mode``."""
        if isinstance(generator, (list, tuple)):
            return torch.cat([
                self.make_mask(view[row : row + 1], None if scores is None else scores[row : row + 1], generator[row])
                for row in range(view.shape[0])
            ])
        masking = self.config.masking
        cells = tuple(size // self.cell_voxels for size in view.shape[2:])
        batch, num_cells = view.shape[0], cells[0] * cells[1] * cells[2]
        if masking.mode == "attention":
            flat = attention_guided_mask(scores, masking.ratio, masking.hint_ratio, masking.hints, generator)
        elif masking.mode == "attention_high":
            flat = attention_high_mask(scores, masking.ratio, generator)
        elif masking.mode == "attention_low":
            flat = attention_low_mask(scores, masking.ratio, generator)
        elif masking.mode == "random":
            flat = random_mask(batch, num_cells, masking.ratio, view.device, generator)
        else:
            flat = block_mask(
                batch, cells, masking.ratio, masking.block_min_cells, masking.block_min_aspect, view.device, generator
            )
        return flat.reshape(batch, *cells)

    @torch.no_grad()
    def prepare(
        self,
        view_u: torch.Tensor,
        view_v: torch.Tensor,
        teacher_temperature: float,
        generator: Generators = None,
    ) -> PreparedViews:
        """Run the no-grad half of a step: teacher dropout, teacher passes and the student's masks.

        Args:
            view_u, view_v: (B, 1, X, Y, Z) random crops of the same volumes, scaled to [0, 1].
            teacher_temperature: the teacher's sharpening temperature at this step.
            generator: CPU random generator for dropout, tie-breaking, hints and random masks, or a list
                of B generators, one per image. With one generator per image, an image's masks do not
                depend on the other images of the batch, so a batch split over several processes gets
                the masks of the same batch in one process.
        """
        views = (view_u, view_v)
        drops = [self._teacher_dropout(view, generator) for view in views]
        distills = bool(self.teacher.head_names)
        teacher = [self._teacher_pass(view, drop) if distills else None for view, drop in zip(views, drops)]

        ranked = self.config.masking.mode.startswith("attention")
        masks = [
            self.make_mask(view, self._ranking_scores(view, out, drop) if ranked else None, generator)
            for view, out, drop in zip(views, teacher, drops)
        ]
        return PreparedViews(views, teacher, masks, teacher_temperature)

    def view_loss(self, prepared: PreparedViews, index: int) -> dict[str, torch.Tensor]:
        """Run the student on view ``index`` (0 for u, 1 for v) and return that view's half of each term.

        The two views' halves depend on each other only through the teacher's detached targets, so a
        trainer may backpropagate one view before the student runs on the other. That keeps one view's
        activations in memory instead of two. The halves of both views sum to ``loss_terms``.
        """
        view, mask = prepared.views[index], prepared.masks[index]
        student = self._student_pass(view, mask)
        return self._view_terms(prepared.views, prepared.targets, student, prepared.masks, index, prepared.temperature)

    def summarize(
        self, prepared: PreparedViews, total: torch.Tensor, terms: dict[str, torch.Tensor], update_centers: bool = True
    ) -> StepOutput:
        """Collect a step's losses, masked fraction and teacher statistics.

        Args:
            prepared: the step's views, teacher targets and masks.
            total, terms: the weighted loss and its terms, summed over both views.
            update_centers: move the centers towards this step's teacher logits when ``total`` is finite.
                A multi-process trainer passes False and calls ``update_centers`` once all processes
                have confirmed that their losses are finite, because the update all-reduces across processes.
        """
        teacher = prepared.targets
        entropy = float("nan")
        center_logits = {}
        if self.teacher.head_names:
            center_logits = {role: torch.cat([output[role].flatten(0, -2) for output in teacher]) for role in self.teacher.head_names}
            if update_centers and torch.isfinite(total):
                self.update_centers(center_logits)
            watched = next(role for role in ("cls", "global", "patch") if role in self.teacher.head_names)
            logits = (teacher[0][watched].float() - getattr(self.centers, watched)) / prepared.temperature
            probabilities = torch.softmax(logits, dim=-1)
            entropy = float(-(probabilities * probabilities.clamp_min(1e-12).log()).sum(dim=-1).mean())
        return StepOutput(
            total=total,
            terms={name: value.detach() for name, value in terms.items()},
            masked_fraction=float(torch.stack(prepared.masks).float().mean()),
            teacher_entropy=entropy,
            teacher_kl_uniform=math.log(self.config.loss.out_dim) - entropy,
            center_logits=center_logits,
        )

    def forward(
        self,
        view_u: torch.Tensor,
        view_v: torch.Tensor,
        teacher_temperature: float,
        generator: Generators = None,
        update_centers: bool = True,
    ) -> StepOutput:
        """Compute the co-distillation loss for two views of the same CTs, both views in one graph.

        The arguments are those of ``prepare``, and ``update_centers`` that of ``summarize``. The
        trainer instead calls ``prepare``, then ``view_loss`` and backward once per view.
        """
        prepared = self.prepare(view_u, view_v, teacher_temperature, generator)
        student = [self._student_pass(view, mask) for view, mask in zip(prepared.views, prepared.masks)]
        terms = self.loss_terms(prepared.views, prepared.targets, student, prepared.masks, teacher_temperature)
        return self.summarize(prepared, self.weighted_total(terms), terms, update_centers)

    def loss_terms(
        self,
        views: tuple[torch.Tensor, torch.Tensor],
        targets: list[dict],
        student: list[dict],
        masks: list[torch.Tensor],
        teacher_temperature: float,
    ) -> dict[str, torch.Tensor]:
        """Compute the enabled loss terms of both views, each averaged over the two views.

        Args:
            views: the two crops (B, 1, X, Y, Z), which AMIP reconstructs.
            targets: per view, the teacher's head outputs by role (``cls``, ``patch``, ``global``).
            student: per view, the student's head outputs by role and ``reconstruction``.
            masks: per view, the (B, n_x, n_y, n_z) cell mask the student saw.
            teacher_temperature: the teacher's sharpening temperature at this step.
        """
        halves = [self._view_terms(views, targets, student[i], masks, i, teacher_temperature) for i in (0, 1)]
        return {name: halves[0][name] + halves[1][name] for name in halves[0]}

    def _view_terms(
        self,
        views: tuple[torch.Tensor, torch.Tensor],
        targets: list[dict],
        student: dict,
        masks: list[torch.Tensor],
        index: int,
        teacher_temperature: float,
    ) -> dict[str, torch.Tensor]:
        """Return half of each enabled term for student view ``index``, whose outputs are ``student``."""
        loss = self.config.loss

        def cross_entropy(role: str, teacher_logits: torch.Tensor) -> torch.Tensor:
            return distillation_cross_entropy(
                teacher_logits, student[role], getattr(self.centers, role), teacher_temperature, loss.student_temperature
            )

        # AITD and GITD pair the student's view with the teacher's other view. AMPD pairs the same view.
        own, other = targets[index], targets[1 - index]
        terms: dict[str, torch.Tensor] = {}
        if loss.aitd:
            terms["aitd"] = 0.5 * cross_entropy("cls", other["cls"]).mean()
        if loss.ampd:
            terms["ampd"] = 0.5 * masked_patch_mean(cross_entropy("patch", own["patch"]), masks[index].flatten(1))
        if loss.gitd:
            terms["gitd"] = 0.5 * cross_entropy("global", other["global"]).mean()
        if loss.amip:
            voxel_mask = cells_to_voxels(masks[index], self.cell_voxels)
            terms["amip"] = 0.5 * masked_l1(student["reconstruction"], views[index], voxel_mask)
        return terms

    def weighted_total(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Return the sum of each term times its ``loss.<term>_weight``."""
        return sum(getattr(self.config.loss, f"{name}_weight") * value for name, value in terms.items())

    @torch.no_grad()
    def update_centers(self, center_logits: dict[str, torch.Tensor]) -> None:
        """Move each center towards the mean of its teacher logits (all-reduced across processes)."""
        for role, logits in center_logits.items():
            self.centers.update(role, logits)

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """Return the teacher encoder's weights, which DINO-style methods keep as the pretrained model."""
        return copy.deepcopy(self.teacher.encoder.state_dict())
