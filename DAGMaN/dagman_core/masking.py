"""Attention-guided masking of the student's views and patch dropout of the noisy teacher's views."""

from __future__ import annotations

import math

import torch


def masked_cell_count(num_cells: int, ratio: float, hint_ratio: float, hints: str) -> int:
    """Return how many of ``num_cells`` cells attention-guided masking hides.

    With ``hints="top"`` the top ``floor(hint_ratio N)`` cells stay visible and ranks up to
    ``floor(ratio N)`` are masked (307 of 512 at ratio 0.7, hint ratio 0.1). With ``hints="sampled"``
    (AttMask) the top ``floor(ratio N)`` are masked, then ``floor(hint_ratio ratio N)`` of the top
    ``floor(hint_ratio N)`` are revealed at random (323 of 512).
    """
    masked = math.floor(ratio * num_cells)
    if hints == "top":
        return masked - math.floor(hint_ratio * num_cells)
    if hints == "sampled":
        return masked - math.floor(hint_ratio * ratio * num_cells)
    raise ValueError(f"hints {hints!r} is invalid; valid choices: ['top', 'sampled']")


def rank_descending(scores: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return the cell indices (B, N) sorted by descending score, ties broken at random.

    Args:
        scores: (B, N) attention scores; compared in fp32 and detached.
    """
    scores = scores.detach().float()
    shuffle = torch.rand(scores.shape, generator=generator, device="cpu").argsort(dim=1).to(scores.device)
    shuffled = torch.gather(scores, 1, shuffle)
    order = torch.argsort(shuffled, dim=1, descending=True, stable=True)
    return torch.gather(shuffle, 1, order)


def attention_guided_mask(
    scores: torch.Tensor,
    ratio: float = 0.7,
    hint_ratio: float = 0.1,
    hints: str = "top",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mask the most attended cells except a few hints.

    Args:
        scores: (B, N) attention over the N mask cells (S_ATT of the ranking network).
        ratio: fraction r of cells in the masked band, k = floor(r N).
        hint_ratio: fraction s of the top cells used as hints, h = floor(s N).
        hints: ``"top"`` keeps ranks 0 .. h-1 visible and masks ranks h .. k-1; ``"sampled"`` masks
            ranks 0 .. k-1, then reveals floor(s r N) cells drawn at random from ranks 0 .. h-1.
        generator: random generator for tie-breaking and sampled hints (CPU).

    Returns:
        (B, N) bool, True for masked cells.
    """
    batch, num_cells = scores.shape
    order = rank_descending(scores, generator)
    masked_band = math.floor(ratio * num_cells)
    hint_band = math.floor(hint_ratio * num_cells)

    rank_mask = torch.zeros(batch, num_cells, dtype=torch.bool, device=scores.device)
    if hints == "top":
        rank_mask[:, hint_band:masked_band] = True
    elif hints == "sampled":
        rank_mask[:, :masked_band] = True
        revealed = math.floor(hint_ratio * ratio * num_cells)
        for row in range(batch):
            chosen = torch.randperm(hint_band, generator=generator)[:revealed].to(scores.device)
            rank_mask[row, chosen] = False
    else:
        raise ValueError(f"hints {hints!r} is invalid; valid choices: ['top', 'sampled']")

    mask = torch.zeros_like(rank_mask)
    mask.scatter_(1, order, rank_mask)
    return mask


def patch_dropout(
    batch: int,
    patch_grid: tuple[int, int, int],
    ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw the noisy teacher's patch dropout: floor(ratio M) of the M patch embeddings of each view.

    Returns:
        (B, p_x, p_y, p_z) bool, True for zeroed patch embeddings, drawn independently per view.
    """
    num_patches = patch_grid[0] * patch_grid[1] * patch_grid[2]
    dropped = math.floor(ratio * num_patches)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    drop = torch.zeros(batch, num_patches, dtype=torch.bool)
    drop.scatter_(1, order[:, :dropped], True)
    return drop.reshape(batch, *patch_grid).to(device)


def cells_to_voxels(cell_mask: torch.Tensor, cell_voxels: int) -> torch.Tensor:
    """Expand a (B, n_x, n_y, n_z) cell mask to a (B, 1, X, Y, Z) float voxel mask."""
    voxels = cell_mask[:, None].float()
    for axis in (2, 3, 4):
        voxels = voxels.repeat_interleave(cell_voxels, dim=axis)
    return voxels
