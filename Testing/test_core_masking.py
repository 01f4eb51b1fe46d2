"""Attention-guided masking and the noisy teacher's patch dropout."""

import math

import torch

from dagman_core.masking import attention_guided_mask, masked_cell_count, patch_dropout


def test_top_hints_mask_307_of_512():
    scores = torch.rand(2, 512, generator=torch.Generator().manual_seed(0))
    mask = attention_guided_mask(scores, ratio=0.7, hint_ratio=0.1, hints="top")

    assert mask.shape == (2, 512)
    assert mask.sum(dim=1).tolist() == [307, 307]
    assert masked_cell_count(512, 0.7, 0.1, "top") == 307


def test_top_ranked_cells_stay_visible_as_hints():
    scores = torch.rand(1, 512, generator=torch.Generator().manual_seed(1))
    mask = attention_guided_mask(scores, hints="top")[0]
    order = torch.argsort(scores[0], descending=True)

    assert not mask[order[0]]
    assert not mask[order[:51]].any()
    assert mask[order[51:358]].all()
    assert not mask[order[358:]].any()


def test_sampled_hints_mask_323_of_512():
    scores = torch.rand(3, 512, generator=torch.Generator().manual_seed(2))
    mask = attention_guided_mask(scores, hints="sampled", generator=torch.Generator().manual_seed(3))
    assert mask.sum(dim=1).tolist() == [323, 323, 323]

    order = torch.argsort(scores[0], descending=True)
    revealed_top = (~mask[0, order[:51]]).sum().item()
    assert revealed_top == math.floor(0.1 * 0.7 * 512)
    assert mask[0, order[51:358]].all()


def test_ties_broken_at_random():
    scores = torch.zeros(1, 512)
    first = attention_guided_mask(scores, generator=torch.Generator().manual_seed(0))
    second = attention_guided_mask(scores, generator=torch.Generator().manual_seed(1))
    assert first.sum() == second.sum() == 307
    assert not torch.equal(first, second)


def test_patch_dropout_zeroes_floor_of_ratio_per_view():
    drop = patch_dropout(3, (64, 64, 64), 0.7, generator=torch.Generator().manual_seed(0))
    expected = math.floor(0.7 * 64**3)

    assert drop.shape == (3, 64, 64, 64)
    assert drop.flatten(1).sum(dim=1).tolist() == [expected] * 3
    assert not torch.equal(drop[0], drop[1])
