"""The method's equations checked against values worked out by hand.

Covers S_ATT (Eq. 1 of "Co-distilled attention guided masked image modeling with noisy teacher"), the
masking modes and the noisy teacher's dropout, the distillation and reconstruction losses, the pairing
of views in the co-distillation step, the per-step schedules and the training step's frozen last layer
and skipped non-finite steps. Every expected value is written out in the test, so a test never compares
the code with itself.
"""

import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from dagman_core.codistillation import CoDistillation
from dagman_core.config import load_config
from dagman_core.losses import distillation_cross_entropy, masked_l1, masked_patch_mean
from dagman_core.masking import (
    attention_guided_mask,
    attention_high_mask,
    attention_low_mask,
    block_mask,
    cell_dropout,
    masked_cell_count,
    patch_dropout,
    random_mask,
)
from dagman_core.models.semantic_attention import Attention, cls_attention_to_s_att
from dagman_core.schedules import cosine_schedule, ema_momentum_schedule, teacher_temperature_schedule
from dagman_train.pretrain import _train_step, parameter_groups


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------------
# Eq. 1: S_ATT from the [CLS] attention row
# ---------------------------------------------------------------------------------------------------


def test_s_att_drops_cls_column_without_renormalising():
    # B = 2 images, 2 heads and N = 3 cells. Column 0 is the [CLS] key.
    cls_attention = torch.tensor(
        [
            [[0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.2, 0.1]],
            [[0.5, 0.25, 0.125, 0.125], [0.7, 0.1, 0.1, 0.1]],
        ]
    )

    s_att = cls_attention_to_s_att(cls_attention)

    # Image 0: head mean [0.2, 0.3, 0.25, 0.25], so S_ATT = [0.3, 0.25, 0.25], summing to 1 - 0.2 = 0.8.
    # Image 1: head mean [0.6, 0.175, 0.1125, 0.1125], so S_ATT = [0.175, 0.1125, 0.1125], summing to 0.4.
    torch.testing.assert_close(s_att, torch.tensor([[0.3, 0.25, 0.25], [0.175, 0.1125, 0.1125]]))
    torch.testing.assert_close(s_att.sum(dim=1), torch.tensor([0.8, 0.4]))


def test_attention_cls_row_over_all_keys():
    attention = Attention(dim=2, num_heads=1)
    with torch.no_grad():
        # q = k = v = tokens and an identity output projection.
        attention.qkv.weight.copy_(torch.eye(2).repeat(3, 1))
        attention.qkv.bias.zero_()
        attention.proj.weight.copy_(torch.eye(2))
        attention.proj.bias.zero_()
    # [CLS] = (1, 0), cell 1 = (2, 1), cell 2 = (0, 1).
    tokens = torch.tensor([[[1.0, 0.0], [2.0, 1.0], [0.0, 1.0]]])

    output, weights = attention(tokens, return_cls_attention=True)

    # q_cls . k / sqrt(2) = [1, 2, 0] / sqrt(2) = [0.7071, 1.4142, 0]; exp = [2.0281, 4.1133, 1], sum 7.1414.
    exponentials = [math.exp(1 / math.sqrt(2)), math.exp(2 / math.sqrt(2)), 1.0]
    p_cls, p_1, p_2 = (value / sum(exponentials) for value in exponentials)  # 0.2840, 0.5760, 0.1400
    assert weights.shape == (1, 1, 3)
    torch.testing.assert_close(weights, torch.tensor([[[p_cls, p_1, p_2]]]))

    # The [CLS] output is the same weights applied to v: p_cls (1, 0) + p_1 (2, 1) + p_2 (0, 1).
    torch.testing.assert_close(output[0, 0], torch.tensor([p_cls + 2 * p_1, p_1 + p_2]))

    s_att = cls_attention_to_s_att(weights)
    torch.testing.assert_close(s_att, torch.tensor([[p_1, p_2]]))
    assert s_att.sum().item() == pytest.approx(1 - p_cls)  # 0.7160


# ---------------------------------------------------------------------------------------------------
# Masking of the student's views
# ---------------------------------------------------------------------------------------------------

# Twenty cells listed from the highest score to the lowest: rank 0 is cell 7, rank 19 is cell 13.
RANKING_20 = [7, 3, 15, 0, 12, 19, 5, 9, 1, 17, 10, 4, 14, 8, 2, 18, 6, 11, 16, 13]


def scores_from_ranking(ranking: list[int]) -> torch.Tensor:
    """Return (1, N) distinct scores whose descending order is ``ranking``: 1.0, 0.95, 0.90, ..."""
    scores = torch.zeros(1, len(ranking))
    for rank, cell in enumerate(ranking):
        scores[0, cell] = 1.0 - 0.05 * rank
    return scores


def masked_cells(mask_row: torch.Tensor) -> list[int]:
    return mask_row.nonzero().flatten().tolist()


def test_masked_cell_count_subtracts_hints():
    # top: floor(0.7 * 512) - floor(0.1 * 512) = 358 - 51 = 307.
    assert masked_cell_count(512, 0.7, 0.1, "top") == 307
    # sampled: 358 - floor(0.1 * 0.7 * 512) = 358 - floor(35.84) = 323.
    assert masked_cell_count(512, 0.7, 0.1, "sampled") == 323
    # N = 20: top 14 - 2 = 12; sampled 14 - floor(1.4) = 13.
    assert masked_cell_count(20, 0.7, 0.1, "top") == 12
    assert masked_cell_count(20, 0.7, 0.1, "sampled") == 13
    # N = 64 (a 64^3 crop): top 44 - 6 = 38.
    assert masked_cell_count(64, 0.7, 0.1, "top") == 38

    with pytest.raises(ValueError, match="hints"):
        masked_cell_count(512, 0.7, 0.1, "bottom")


def test_top_hints_mask_ranks_2_to_13():
    scores = torch.cat([scores_from_ranking(RANKING_20), scores_from_ranking(RANKING_20[::-1])])

    mask = attention_guided_mask(scores, ratio=0.7, hint_ratio=0.1, hints="top", generator=seeded(0))

    # k = floor(0.7 * 20) = 14, h = floor(0.1 * 20) = 2: ranks 2..13 masked, 12 cells per image.
    # Image 0: ranks 2..13 are cells 15, 0, 12, 19, 5, 9, 1, 17, 10, 4, 14, 8.
    assert masked_cells(mask[0]) == [0, 1, 4, 5, 8, 9, 10, 12, 14, 15, 17, 19]
    # Image 1 ranks the cells in reverse: ranks 2..13 are 11, 6, 18, 2, 8, 14, 4, 10, 17, 1, 9, 5.
    assert masked_cells(mask[1]) == [1, 2, 4, 5, 6, 8, 9, 10, 11, 14, 17, 18]
    # The hints (ranks 0, 1) and the tail (ranks 14..19) stay visible.
    assert not mask[0, [7, 3]].any()
    assert not mask[0, [2, 18, 6, 11, 16, 13]].any()
    assert not mask[1, [13, 16]].any()
    assert not mask[1, [19, 12, 0, 15, 3, 7]].any()


def test_sampled_hints_come_from_top_band():
    # N = 512: k = floor(0.7 * 512) = 358, h = floor(0.1 * 512) = 51, floor(0.1 * 0.7 * 512) = 35 revealed.
    revealed_sets = []
    for seed in range(4):
        scores = torch.randperm(512 * 3, generator=seeded(100 + seed)).float().reshape(3, 512)

        mask = attention_guided_mask(scores, ratio=0.7, hint_ratio=0.1, hints="sampled", generator=seeded(seed))

        assert mask.sum(dim=1).tolist() == [358 - 35] * 3
        for row in range(3):
            by_rank = mask[row, torch.argsort(scores[row], descending=True)]
            assert int((~by_rank[:51]).sum()) == 35
            assert by_rank[51:358].all()
            assert not by_rank[358:].any()
            revealed_sets.append(frozenset((~by_rank[:51]).nonzero().flatten().tolist()))

    # The revealed hints are drawn at random, so 12 images do not all reveal the same ranks.
    assert len(set(revealed_sets)) > 1


def test_attention_high_masks_top_cells():
    mask = attention_high_mask(scores_from_ranking(RANKING_20), ratio=0.5, generator=seeded(0))

    # floor(0.5 * 20) = 10: ranks 0..9 are cells 7, 3, 15, 0, 12, 19, 5, 9, 1, 17.
    assert masked_cells(mask[0]) == [0, 1, 3, 5, 7, 9, 12, 15, 17, 19]


def test_attention_low_mask_hides_the_least_attended_cells():
    mask = attention_low_mask(scores_from_ranking(RANKING_20), ratio=0.25, generator=seeded(0))

    # floor(0.25 * 20) = 5: ranks 15..19 are cells 18, 6, 11, 16, 13.
    assert masked_cells(mask[0]) == [6, 11, 13, 16, 18]


def test_random_mask_count_per_image():
    mask = random_mask(4, 64, 0.7, generator=seeded(0))

    # floor(0.7 * 64) = floor(44.8) = 44 per image.
    assert mask.shape == (4, 64)
    assert mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [44] * 4
    assert len({tuple(row.tolist()) for row in mask}) == 4


def component_sizes(mask: torch.Tensor, grid: tuple[int, int, int]) -> list[int]:
    """Return the sizes of the 6-connected components of a flat bool mask on ``grid`` (flood fill)."""
    cells = mask.reshape(grid).tolist()
    seen = set()
    sizes = []
    for start in np.ndindex(*grid):
        if not cells[start[0]][start[1]][start[2]] or start in seen:
            continue
        seen.add(start)
        stack, size = [start], 0
        while stack:
            x, y, z = stack.pop()
            size += 1
            for dx, dy, dz in ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
                neighbour = (x + dx, y + dy, z + dz)
                inside = all(0 <= index < size_ for index, size_ in zip(neighbour, grid))
                if inside and neighbour not in seen and cells[neighbour[0]][neighbour[1]][neighbour[2]]:
                    seen.add(neighbour)
                    stack.append(neighbour)
        sizes.append(size)
    return sizes


def test_flood_fill_counts_face_connected_components():
    # Two cells sharing a face form one component, but a diagonal neighbour is a component of its own.
    mask = torch.zeros(2, 2, 2, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[1, 1, 0] = True

    assert sorted(component_sizes(mask.flatten(), (2, 2, 2))) == [1, 2]


def test_block_mask_components_larger_than_random():
    grid = (8, 8, 8)

    blocks = block_mask(8, grid, 0.3, min_cells=4, min_aspect=0.3, generator=seeded(0))
    scattered = random_mask(8, 512, 0.3, generator=seeded(0))

    # floor(0.3 * 512) = floor(153.6) = 153 cells per image in both modes.
    assert blocks.shape == (8, 512)
    assert blocks.sum(dim=1).tolist() == [153] * 8
    block_sizes = [size for row in blocks for size in component_sizes(row, grid)]
    random_sizes = [size for row in scattered for size in component_sizes(row, grid)]
    # With these generators the mean component has about 68 cells for blocks and 3.6 for random cells.
    assert np.mean(block_sizes) > 4 * np.mean(random_sizes)
    # A few boxes, not dozens of scattered cells: at most 8 components per image.
    assert max(len(component_sizes(row, grid)) for row in blocks) <= 8


def test_block_mask_8_cells_is_cube():
    # floor(0.015625 * 512) = 8 <= min_cells = 8, so the box volume is drawn from [8, 8]. min_aspect = 1
    # forces both aspect ratios to 1: side round(8^(1/3)) = 2, one 2x2x2 box covers the target at once.
    for seed in range(5):
        mask = block_mask(1, (8, 8, 8), 0.015625, min_cells=8, min_aspect=1.0, generator=seeded(seed))[0]

        assert int(mask.sum()) == 8
        assert component_sizes(mask, (8, 8, 8)) == [8]
        coordinates = mask.reshape(8, 8, 8).nonzero()
        assert (coordinates.max(dim=0).values - coordinates.min(dim=0).values).tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------------------
# The noisy teacher's dropout
# ---------------------------------------------------------------------------------------------------


def test_patch_dropout_count_per_view():
    drop = patch_dropout(3, (4, 4, 4), 0.7, generator=seeded(0))

    # floor(0.7 * 64) = 44 of the 64 patches of each view.
    assert drop.shape == (3, 4, 4, 4)
    assert drop.dtype == torch.bool
    assert drop.flatten(1).sum(dim=1).tolist() == [44] * 3
    assert len({tuple(view.flatten().tolist()) for view in drop}) == 3


def test_cell_dropout_drops_whole_cells_of_4x4x4_patches():
    # Cell grid 2^3 inside a patch grid 8^3: each cell covers (8 / 2)^3 = 64 patches.
    drop = cell_dropout(2, (2, 2, 2), (8, 8, 8), 0.7, generator=seeded(0))

    assert drop.shape == (2, 8, 8, 8)
    # Each 4x4x4 block is either all dropped or all kept, and floor(0.7 * 8) = 5 of the 8 blocks are dropped.
    blocks = drop.reshape(2, 2, 4, 2, 4, 2, 4).permute(0, 1, 3, 5, 2, 4, 6).reshape(2, 8, 64)
    block_sums = blocks.sum(dim=2)
    assert set(block_sums.flatten().tolist()) <= {0, 64}
    assert (block_sums == 64).sum(dim=1).tolist() == [5, 5]
    assert drop.flatten(1).sum(dim=1).tolist() == [5 * 64] * 2


# ---------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------


def test_distillation_cross_entropy_of_a_centred_sharpened_teacher():
    # Token 0: teacher t = [2, 1, 0], center c = [1, 0, 0], tau_t = 0.5, so (t - c) / tau_t = [2, 2, 0].
    # Token 1: teacher equal to the center, so the teacher is uniform.
    teacher = torch.tensor([[2.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    student = torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 0.3]])
    center = torch.tensor([1.0, 0.0, 0.0])

    loss = distillation_cross_entropy(teacher, student, center, teacher_temperature=0.5, student_temperature=0.1)

    # Teacher: [e^2, e^2, 1] / (2 e^2 + 1) = [0.46831, 0.46831, 0.06338].
    p = [math.exp(2) / (2 * math.exp(2) + 1)] * 2 + [1 / (2 * math.exp(2) + 1)]
    # Student: s / tau_s = [1, 2, 3]; log Z = log(e + e^2 + e^3) = 3.40761; log-softmax = [1, 2, 3] - log Z.
    log_z = math.log(math.e + math.e**2 + math.e**3)
    log_q = [1 - log_z, 2 - log_z, 3 - log_z]
    token_0 = -sum(p_k * log_q_k for p_k, log_q_k in zip(p, log_q))  # 1.81254
    token_1 = log_z - (1 + 2 + 3) / 3  # uniform teacher: -mean(log_q) = 1.40761
    torch.testing.assert_close(loss, torch.tensor([token_0, token_1]))


def test_masked_patch_mean_averages_each_image_first():
    per_cell = torch.tensor([[4.0, 9.0, 9.0, 9.0], [1.0, 2.0, 3.0, 100.0]])
    cell_mask = torch.tensor([[True, False, False, False], [True, True, True, False]])

    # Image 0: 4 / 1 = 4. Image 1: (1 + 2 + 3) / 3 = 2. Mean (4 + 2) / 2 = 3, not (4 + 1 + 2 + 3) / 4 = 2.5.
    assert masked_patch_mean(per_cell, cell_mask).item() == pytest.approx(3.0)


def test_masked_l1_ignores_unmasked_voxels():
    target = torch.zeros(2, 1, 2, 2, 1)
    prediction = torch.tensor([[1.0, 50.0, 50.0, 50.0], [2.0, -2.0, 2.0, 70.0]]).reshape(2, 1, 2, 2, 1)
    voxel_mask = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]]).reshape(2, 1, 2, 2, 1)

    # (|1| + |2| + |-2| + |2|) / (4 + 1e-5) = 7 / 4.00001. The unmasked errors 50 and 70 don't count.
    assert masked_l1(prediction, target, voxel_mask).item() == pytest.approx(7 / (4 + 1e-5), rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Pairing of the views in the co-distillation step
# ---------------------------------------------------------------------------------------------------

OUT_DIM = 1024  # K of tiny_cpu
STUDENT_TEMPERATURE = 0.1
TEACHER_TEMPERATURE = 0.04
CELLS = 64  # a 64^3 crop contains 4^3 cells of 16^3 voxels
CELL_VOXELS = 16


def one_hot_teacher_logits(classes_per_image: list[int], cells: int | None = None) -> torch.Tensor:
    """Teacher logits 10 at one class and 0 elsewhere, (B, K) or (B, cells, K) when ``cells`` is given.

    With a zero center and tau_t = 0.04 the other classes get exp(-250), which is 0 in float32, so the
    teacher's distribution is exactly one-hot.
    """
    logits = torch.zeros(len(classes_per_image), OUT_DIM)
    for image, target in enumerate(classes_per_image):
        logits[image, target] = 10.0
    if cells is not None:
        logits = logits[:, None].expand(-1, cells, -1).clone()
    return logits


def student_logits(entries: dict[tuple, float], shape: tuple[int, ...]) -> torch.Tensor:
    """Student logits of ``shape``, 0 except at the ``entries`` indices."""
    logits = torch.zeros(*shape, OUT_DIM)
    for index, value in entries.items():
        logits[index] = value
    return logits


def cross_entropy_to_one_hot(logits: dict[int, float], target: int) -> float:
    """Cross-entropy of a one-hot teacher at ``target`` against student logits (0 except at ``logits``).

    It is log Z - s_target / tau_s, with Z = sum_k exp(s_k / tau_s) and K - len(logits) terms exp(0) = 1.
    """
    scaled = {index: value / STUDENT_TEMPERATURE for index, value in logits.items()}
    log_z = math.log(sum(math.exp(value) for value in scaled.values()) + (OUT_DIM - len(scaled)))
    return log_z - scaled.get(target, 0.0)


def cell_mask_from_lists(masked_per_image: list[list[int]]) -> torch.Tensor:
    """A (B, 4, 4, 4) cell mask that hides the listed cells (raster order) of each image."""
    mask = torch.zeros(len(masked_per_image), CELLS, dtype=torch.bool)
    for image, cells in enumerate(masked_per_image):
        mask[image, cells] = True
    return mask.reshape(-1, 4, 4, 4)


def reconstruction_with_errors(
    value: float, errors: dict[tuple[int, int], float], unmasked_error: float
) -> torch.Tensor:
    """A (2, 1, 64, 64, 64) reconstruction of a constant view: ``value`` plus an error per (image, cell)."""
    cell_errors = torch.full((2, CELLS), unmasked_error)
    for (image, cell), error in errors.items():
        cell_errors[image, cell] = error
    voxels = cell_errors.reshape(2, 1, 4, 4, 4)
    for axis in (2, 3, 4):
        voxels = voxels.repeat_interleave(CELL_VOXELS, dim=axis)
    return value + voxels


class ScriptedCoDistillation(CoDistillation):
    """A co-distillation step whose teacher, student and masks return outputs chosen per view.

    The views are constant crops, 0.25 for u and 0.75 for v, so ``view.mean()`` identifies the view.
    """

    def __init__(self, config, teacher_outputs: dict, student_outputs: dict, cell_masks: dict):
        super().__init__(config)
        self.teacher_outputs = teacher_outputs
        self.student_outputs = student_outputs
        self.cell_masks = cell_masks
        self.student_masks = {}

    @staticmethod
    def view_name(view: torch.Tensor) -> str:
        return "u" if float(view.mean()) < 0.5 else "v"

    def _teacher_pass(self, view, patch_drop):
        return self.teacher_outputs[self.view_name(view)]

    def make_mask(self, view, scores, generator):
        return self.cell_masks[self.view_name(view)]

    def _student_pass(self, view, cell_mask):
        self.student_masks[self.view_name(view)] = cell_mask
        return self.student_outputs[self.view_name(view)]


VIEW_U = torch.full((2, 1, 64, 64, 64), 0.25)
VIEW_V = torch.full((2, 1, 64, 64, 64), 0.75)

# The teacher's one-hot class is the same for every image and cell. On view u it is 0 for [CLS], 2 for the
# global token and 4 for the patch tokens. On view v it is 1, 3 and 5.
TEACHER_OUTPUTS = {
    "u": {
        "s_att": torch.zeros(2, CELLS),
        "cls": one_hot_teacher_logits([0, 0]),
        "global": one_hot_teacher_logits([2, 2]),
        "patch": one_hot_teacher_logits([4, 4], cells=CELLS),
    },
    "v": {
        "s_att": torch.zeros(2, CELLS),
        "cls": one_hot_teacher_logits([1, 1]),
        "global": one_hot_teacher_logits([3, 3]),
        "patch": one_hot_teacher_logits([5, 5], cells=CELLS),
    },
}

# View u hides cell 0 of image 0 and cells 0, 1, 2 of image 1. View v hides cells 5, 6 and cell 63.
CELL_MASKS = {"u": cell_mask_from_lists([[0], [0, 1, 2]]), "v": cell_mask_from_lists([[5, 6], [63]])}

# Student logits by image: {class: logit}, 0 at every other class.
STUDENT_CLS = {"u": [{0: 0.2, 1: 0.5}, {1: 0.3}], "v": [{0: 0.4}, {0: 0.1, 1: 0.6}]}
STUDENT_GLOBAL = {"u": [{3: 0.7}, {2: 0.4, 3: 0.2}], "v": [{2: 0.3}, {2: 0.5, 3: 0.8}]}
# Student patch logits by (image, cell): only the masked cells get a nonzero logit at their view's class.
STUDENT_PATCH = {
    "u": {(0, 0): 0.5, (1, 0): 0.1, (1, 1): 0.2, (1, 2): 0.3},
    "v": {(0, 5): 0.4, (0, 6): 0.8, (1, 63): 0.6},
}
PATCH_CLASS = {"u": 4, "v": 5}


# Masked cells of u err by 0.5 (image 0) and 0.1, 0.2, 0.3 (image 1), those of v by -0.4, -0.4 and 1.0.
# Unmasked cells err by 10, which must not count.
RECONSTRUCTION_ERRORS = {
    "u": {(0, 0): 0.5, (1, 0): 0.1, (1, 1): 0.2, (1, 2): 0.3},
    "v": {(0, 5): -0.4, (0, 6): -0.4, (1, 63): 1.0},
}


def indexed_by_image(logits_per_image: list[dict[int, float]]) -> dict[tuple[int, int], float]:
    return {(image, index): logit for image, logits in enumerate(logits_per_image) for index, logit in logits.items()}


def student_outputs() -> dict:
    outputs = {}
    for view, value in (("u", 0.25), ("v", 0.75)):
        patch = {(image, cell, PATCH_CLASS[view]): logit for (image, cell), logit in STUDENT_PATCH[view].items()}
        outputs[view] = {
            "cls": student_logits(indexed_by_image(STUDENT_CLS[view]), (2,)),
            "global": student_logits(indexed_by_image(STUDENT_GLOBAL[view]), (2,)),
            "patch": student_logits(patch, (2, CELLS)),
            "reconstruction": reconstruction_with_errors(value, RECONSTRUCTION_ERRORS[view], unmasked_error=10.0),
        }
    return outputs


def expected_terms() -> dict[str, float]:
    """The four terms worked out from the scripted outputs above."""
    ce = cross_entropy_to_one_hot

    # AITD is cross-view: student u against the teacher's v (class 1), student v against the teacher's u
    # (class 0). Each pair is averaged over images, then the two pairs are averaged.
    student_u_vs_teacher_v = (ce({0: 0.2, 1: 0.5}, 1) + ce({1: 0.3}, 1)) / 2
    student_v_vs_teacher_u = (ce({0: 0.4}, 0) + ce({0: 0.1, 1: 0.6}, 0)) / 2
    aitd = (student_u_vs_teacher_v + student_v_vs_teacher_u) / 2

    # GITD is cross-view: student u against class 3 (teacher v), student v against class 2 (teacher u).
    global_u_vs_v = (ce({3: 0.7}, 3) + ce({2: 0.4, 3: 0.2}, 3)) / 2
    global_v_vs_u = (ce({2: 0.3}, 2) + ce({2: 0.5, 3: 0.8}, 2)) / 2
    gitd = (global_u_vs_v + global_v_vs_u) / 2

    # AMPD pairs the same view over masked cells only: the mean over each image's masked cells, then over images.
    ampd_u = (ce({4: 0.5}, 4) + (ce({4: 0.1}, 4) + ce({4: 0.2}, 4) + ce({4: 0.3}, 4)) / 3) / 2
    ampd_v = ((ce({5: 0.4}, 5) + ce({5: 0.8}, 5)) / 2 + ce({5: 0.6}, 5)) / 2
    ampd = (ampd_u + ampd_v) / 2

    # AMIP: L1 over the masked voxels of each view (16^3 = 4096 voxels per cell), pooled over the batch.
    # u: (0.5 + 0.1 + 0.2 + 0.3) * 4096 / (4 * 4096) = 0.275; v: (0.4 + 0.4 + 1.0) * 4096 / (3 * 4096) = 0.6.
    voxels = CELL_VOXELS**3
    amip_u = (0.5 + 0.1 + 0.2 + 0.3) * voxels / (4 * voxels + 1e-5)
    amip_v = (0.4 + 0.4 + 1.0) * voxels / (3 * voxels + 1e-5)
    amip = (amip_u + amip_v) / 2  # 0.4375

    return {"aitd": aitd, "gitd": gitd, "ampd": ampd, "amip": amip}


def test_one_hot_cross_entropy_helper_gives_ln_2():
    # Student logit 0.1 ln(1023) at the target, 0 elsewhere: log(1023 + 1023) - ln(1023) = ln 2.
    assert cross_entropy_to_one_hot({4: 0.1 * math.log(1023)}, 4) == pytest.approx(math.log(2))
    # All logits 0: ln K.
    assert cross_entropy_to_one_hot({}, 0) == pytest.approx(math.log(1024))


def test_codistillation_pairs_views_as_the_equations_say():
    model = ScriptedCoDistillation(load_config("tiny_cpu"), TEACHER_OUTPUTS, student_outputs(), CELL_MASKS)
    for name in ("cls", "patch", "global"):
        assert not getattr(model.centers, name).any()

    output = model(VIEW_U, VIEW_V, teacher_temperature=TEACHER_TEMPERATURE, generator=seeded(0))

    expected = expected_terms()
    assert set(output.terms) == {"aitd", "gitd", "ampd", "amip"}
    for name, value in expected.items():
        assert output.terms[name].item() == pytest.approx(value, rel=1e-5), name
    # Total: 1 AMIP + 0.1 (AMPD + AITD + GITD).
    total = expected["amip"] + 0.1 * (expected["ampd"] + expected["aitd"] + expected["gitd"])
    assert output.total.item() == pytest.approx(total, rel=1e-5)
    # Each student view got its own view's mask, and 7 of the 2 x 2 x 64 = 256 cells of both views are masked.
    assert torch.equal(model.student_masks["u"], CELL_MASKS["u"])
    assert torch.equal(model.student_masks["v"], CELL_MASKS["v"])
    assert output.masked_fraction == pytest.approx(7 / 256)


def test_centers_move_a_tenth_per_step():
    model = ScriptedCoDistillation(load_config("tiny_cpu"), TEACHER_OUTPUTS, student_outputs(), CELL_MASKS)

    model(VIEW_U, VIEW_V, teacher_temperature=TEACHER_TEMPERATURE, generator=seeded(0))

    # [CLS]: of 4 tokens, two have logit 10 at class 0 and two at class 1, so the mean is 5 at classes 0
    # and 1, and the center becomes 0.9 * 0 + 0.1 * 5 = 0.5 there. The global and patch centers follow suit.
    for name, classes in (("cls", (0, 1)), ("global", (2, 3)), ("patch", (4, 5))):
        expected = torch.zeros(OUT_DIM)
        expected[list(classes)] = 0.5
        torch.testing.assert_close(getattr(model.centers, name), expected)


def test_total_without_gitd_term():
    config = load_config("tiny_cpu", overrides=["loss.gitd=false"])
    model = ScriptedCoDistillation(config, TEACHER_OUTPUTS, student_outputs(), CELL_MASKS)

    output = model(VIEW_U, VIEW_V, teacher_temperature=TEACHER_TEMPERATURE, generator=seeded(0))

    expected = expected_terms()
    assert set(output.terms) == {"aitd", "ampd", "amip"}
    total = expected["amip"] + 0.1 * (expected["ampd"] + expected["aitd"])
    assert output.total.item() == pytest.approx(total, rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------


def test_teacher_temperature_rises_linearly_then_holds():
    schedule = teacher_temperature_schedule(0.04, 0.07, warmup_steps=31, total_steps=100)

    # 31 values from 0.04 to 0.07 in steps of 0.001, then 69 values of 0.07.
    assert len(schedule) == 100
    assert schedule[0] == pytest.approx(0.04)
    assert schedule[1] == pytest.approx(0.041)
    assert schedule[15] == pytest.approx(0.055)
    assert schedule[30] == pytest.approx(0.07)
    assert schedule[31:] == pytest.approx([0.07] * 69)


def test_cosine_weight_decay_passes_the_midpoint_halfway():
    schedule = cosine_schedule(0.04, 0.4, total_steps=101)

    # progress = i / 100, value = 0.4 + 0.5 (0.04 - 0.4) (1 + cos(pi progress)).
    assert len(schedule) == 101
    assert schedule[0] == pytest.approx(0.04)
    assert schedule[25] == pytest.approx(0.4 - 0.18 * (1 + math.cos(math.pi / 4)))  # 0.09272
    assert schedule[50] == pytest.approx(0.22)  # 0.4 - 0.18 (1 + 0)
    assert schedule[100] == pytest.approx(0.4)


def test_learning_rate_warmup_then_cosine():
    schedule = cosine_schedule(1e-3, 1e-6, total_steps=21, warmup_steps=10, warmup_start=0.0)

    # Warmup: 0, 1e-4, ..., 9e-4 (10 steps, the start value excluded). Cosine over the other 11 steps:
    # 1e-3 at step 10, the mean (1e-3 + 1e-6) / 2 at step 15, 1e-6 at step 20.
    assert len(schedule) == 21
    assert schedule[:10] == pytest.approx([i * 1e-4 for i in range(10)])
    assert schedule[10] == pytest.approx(1e-3)
    assert schedule[15] == pytest.approx(5.005e-4)
    assert schedule[20] == pytest.approx(1e-6)


def test_ema_momentum_rises_from_0_996_to_1():
    schedule = ema_momentum_schedule(0.996, 51)

    assert schedule[0] == pytest.approx(0.996)
    assert schedule[25] == pytest.approx(0.998)  # halfway: (0.996 + 1) / 2
    assert schedule[-1] == pytest.approx(1.0)
    assert np.all(np.diff(schedule) >= 0)


# ---------------------------------------------------------------------------------------------------
# Training step: frozen last layer and skipped non-finite steps
# ---------------------------------------------------------------------------------------------------


def train_step(model, optimizer, view_u: torch.Tensor, step: int, frozen_last_layer_steps: int) -> dict:
    steps = 4
    return _train_step(
        model,
        optimizer,
        {"view_u": MetaTensor(view_u), "view_v": MetaTensor(torch.rand_like(view_u))},
        step,
        seeded(step),
        torch.device("cpu"),
        lr_schedule=np.full(steps, 1e-3),
        wd_schedule=np.full(steps, 0.04),
        momentum_schedule=np.full(steps, 0.996),
        temperature_schedule=np.full(steps, 0.04),
        frozen_last_layer_steps=frozen_last_layer_steps,
        clip_grad=3.0,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_last_head_layers_frozen_in_first_epoch_only():
    torch.manual_seed(0)
    model = CoDistillation(load_config("tiny_cpu"))
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model.student), lr=1e-3)
    last_layer_ids = {id(parameter) for parameter in model.student.last_layers()}
    assert len(last_layer_ids) == 3  # one per DINO head: cls, patch, global

    before = {id(parameter): parameter.detach().clone() for parameter in model.student.parameters()}
    record = train_step(model, optimizer, torch.rand(2, 1, 64, 64, 64), step=0, frozen_last_layer_steps=1)

    assert not record["skipped"]
    for parameter in model.student.last_layers():
        assert torch.equal(parameter, before[id(parameter)])
    trained = [
        parameter
        for parameter in model.student.parameters()
        if parameter.requires_grad and id(parameter) not in last_layer_ids
    ]
    assert trained
    for parameter in trained:
        assert not torch.equal(parameter, before[id(parameter)])

    after_first = {id(parameter): parameter.detach().clone() for parameter in model.student.last_layers()}
    train_step(model, optimizer, torch.rand(2, 1, 64, 64, 64), step=1, frozen_last_layer_steps=1)

    for parameter in model.student.last_layers():
        assert not torch.equal(parameter, after_first[id(parameter)])


def test_nan_batch_skips_step_and_changes_nothing():
    torch.manual_seed(0)
    model = CoDistillation(load_config("tiny_cpu"))
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model.student), lr=1e-3)
    view_u = torch.rand(2, 1, 64, 64, 64)
    view_u[0, 0, 10, 10, 10] = float("nan")
    before = snapshot(model)

    record = train_step(model, optimizer, view_u, step=2, frozen_last_layer_steps=1)

    assert record["skipped"] is True
    after = snapshot(model)
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_nonfinite_steps_in_a_row_stop_the_run():
    from dagman_train.pretrain import CollapseWatch, NonFiniteLossError

    config = load_config("tiny_cpu", overrides=["train.max_nonfinite_steps=3"])
    watch = CollapseWatch(config)

    # Two skipped steps, a finite one that resets the run of failures, then three in a row.
    for step in (0, 1):
        watch.observe({"step": step, "loss": float("nan"), "skipped": True})
    watch.observe({"step": 2, "loss": 1.0, "skipped": False, "teacher_entropy": 3.0})
    watch.observe({"step": 3, "loss": float("inf"), "skipped": True})
    watch.observe({"step": 4, "loss": float("nan"), "skipped": True})
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        watch.observe({"step": 5, "loss": float("nan"), "skipped": True})
    assert watch.skipped == 5


def test_uniform_teacher_is_reported_as_collapse(caplog):
    from dagman_train.pretrain import CollapseWatch

    watch = CollapseWatch(load_config("tiny_cpu"), patience=3)
    log_k = math.log(1024)

    # Entropy at ln K for three steps: the teacher outputs the uniform distribution.
    with caplog.at_level("WARNING"):
        for step in range(3):
            watch.observe({"step": step, "loss": 1.0, "skipped": False, "teacher_entropy": log_k})
    assert "uniform for 3 steps" in caplog.text
