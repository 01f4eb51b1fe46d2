"""Distillation cross-entropy, centering, masked losses, EMA teacher and schedules."""

import math

import numpy as np
import pytest
import torch

from dagman_core.codistillation import CoDistillation
from dagman_core.config import load_config
from dagman_core.losses import Centers, distillation_cross_entropy, masked_l1, masked_patch_mean
from dagman_core.masking import patch_dropout
from dagman_core.models.swin import SwinBackbone
from dagman_core.schedules import cosine_schedule, ema_momentum_schedule, teacher_temperature_schedule


def test_cross_entropy_of_uniform_is_log_k():
    k = 8192
    logits = torch.zeros(4, k)
    loss = distillation_cross_entropy(logits, logits, torch.zeros(k), 0.04, 0.1)
    torch.testing.assert_close(loss, torch.full((4,), math.log(k)))
    assert math.log(k) == pytest.approx(9.0109, abs=1e-4)


def test_center_after_one_update_from_zero():
    centers = Centers(out_dim=3, momentum=0.9)
    teacher_logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    centers.update("cls", teacher_logits)
    torch.testing.assert_close(centers.cls, torch.tensor([0.2, 0.3, 0.4]))
    torch.testing.assert_close(centers.patch, torch.zeros(3))


def test_patch_center_averages_over_all_tokens():
    centers = Centers(out_dim=2, momentum=0.5)
    tokens = torch.tensor([[[0.0, 2.0], [2.0, 0.0]], [[4.0, 4.0], [2.0, 2.0]]])
    centers.update("patch", tokens)
    torch.testing.assert_close(centers.patch, torch.tensor([1.0, 1.0]))


def test_masked_patch_mean_per_image_then_batch():
    per_cell = torch.tensor([[1.0, 3.0, 100.0], [2.0, 50.0, 60.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert masked_patch_mean(per_cell, mask).item() == pytest.approx((2.0 + 2.0) / 2)


def test_masked_l1_counts_masked_voxels_only():
    prediction = torch.zeros(1, 1, 2, 2, 2)
    target = torch.ones(1, 1, 2, 2, 2)
    target[0, 0, 1] = 5.0
    voxel_mask = torch.zeros(1, 1, 2, 2, 2)
    voxel_mask[0, 0, 0] = 1.0
    assert masked_l1(prediction, target, voxel_mask).item() == pytest.approx(4.0 / (4.0 + 1e-5))


def test_ema_momentum_first_and_last():
    schedule = ema_momentum_schedule(0.996, 1000)
    assert schedule[0] == pytest.approx(0.996)
    assert schedule[-1] == pytest.approx(1.0)
    assert np.all(np.diff(schedule) >= -1e-12)


def test_cosine_schedule_warmup_then_decay():
    schedule = cosine_schedule(1.0, 0.0, 20, warmup_steps=10)
    assert schedule[0] == pytest.approx(0.0)
    assert schedule[10] == pytest.approx(1.0)
    assert schedule[-1] == pytest.approx(0.0)


def test_teacher_temperature_warms_up_then_holds():
    schedule = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert schedule[0] == pytest.approx(0.04)
    assert schedule[29] == pytest.approx(0.07)
    assert schedule[-1] == pytest.approx(0.07)


def test_patch_dropout_zeroes_patch_embeddings():
    config = load_config("tiny_cpu")
    backbone = SwinBackbone(config.model, drop_path=0.0).eval()
    drop = patch_dropout(2, (16, 16, 16), 0.7, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        patches = backbone(torch.rand(2, 1, 32, 32, 32), patch_drop=drop)[0]

    zero_vectors = (patches.abs().sum(dim=1) == 0).flatten(1).sum(dim=1)
    assert zero_vectors.tolist() == [math.floor(0.7 * 16**3)] * 2


def test_teacher_starts_as_student_and_follows_ema():
    torch.manual_seed(0)
    model = CoDistillation(load_config("tiny_cpu"))
    for student, teacher in zip(model.student.parameters(), model.teacher.parameters()):
        assert torch.equal(student, teacher)
    assert not any(parameter.requires_grad for parameter in model.teacher.parameters())

    student_parameter = next(model.student.parameters())
    teacher_parameter = next(model.teacher.parameters())
    before = teacher_parameter.detach().clone()
    with torch.no_grad():
        student_parameter.add_(1.0)
    model.update_teacher(0.9)
    torch.testing.assert_close(teacher_parameter, before + 0.1)


def test_codistillation_step_reduces_loss_terms_to_scalars():
    torch.manual_seed(0)
    model = CoDistillation(load_config("tiny_cpu"))
    views = torch.rand(2, 1, 1, 64, 64, 64)
    output = model(views[0], views[1], teacher_temperature=0.04, generator=torch.Generator().manual_seed(0))

    assert set(output.terms) == {"amip", "ampd", "aitd", "gitd"}
    assert math.isfinite(output.total.item())
    # 64^3 crops hold 4^3 cells: floor(0.7 * 64) - floor(0.1 * 64) = 38 masked.
    assert output.masked_fraction == pytest.approx(38 / 64)
    expected = output.terms["amip"] + 0.1 * (output.terms["ampd"] + output.terms["aitd"] + output.terms["gitd"])
    assert output.total.item() == pytest.approx(expected.item(), rel=1e-5)


def test_per_view_backward_matches_joint():
    torch.manual_seed(0)
    model = CoDistillation(load_config("tiny_cpu", overrides=["model.drop_path=0.0"]))
    model.train()
    views = torch.rand(2, 2, 1, 64, 64, 64)

    joint = model(views[0], views[1], 0.04, torch.Generator().manual_seed(3), update_centers=False)
    joint.total.backward()
    joint_gradients = {name: p.grad.clone() for name, p in model.student.named_parameters() if p.grad is not None}
    model.student.zero_grad(set_to_none=True)

    prepared = model.prepare(views[0], views[1], 0.04, torch.Generator().manual_seed(3))
    halves = []
    for index in (0, 1):
        half = model.view_loss(prepared, index)
        model.weighted_total(half).backward()
        halves.append(half)

    # The halves sum to the joint terms and their gradients accumulate to the joint gradient.
    for name, value in joint.terms.items():
        torch.testing.assert_close(halves[0][name].detach() + halves[1][name].detach(), value, rtol=1e-5, atol=1e-6)
    assert len(joint_gradients) > 100
    for name, parameter in model.student.named_parameters():
        if name in joint_gradients:
            torch.testing.assert_close(parameter.grad, joint_gradients[name], rtol=1e-4, atol=1e-6, msg=name)
        else:
            assert parameter.grad is None, name
