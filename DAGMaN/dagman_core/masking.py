"""Masking of the student's views (DAGMaN and the baselines) and dropout of the noisy teacher's views.

Every mode works on the grid of mask cells (one cell per SA-stage token, N = 512 at 128^3) and returns
a (B, N) bool mask, True for masked cells, in the (x, y, z) raster order of the SA tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


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


def attention_high_mask(scores: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """AttMask: mask the floor(ratio N) most attended cells (ranks 0 .. k-1), without hints."""
    return _mask_ranks(rank_descending(scores, generator), math.floor(ratio * scores.shape[1]))


def attention_low_mask(scores: torch.Tensor, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """MST: mask the floor(ratio N) least attended cells (ranks N-k .. N-1)."""
    return _mask_ranks(rank_descending(-scores.detach().float(), generator), math.floor(ratio * scores.shape[1]))


def random_mask(
    batch: int, num_cells: int, ratio: float, device: torch.device | str = "cpu", generator: torch.Generator | None = None
) -> torch.Tensor:
    """SMIT: mask floor(ratio N) cells of each image drawn uniformly at random."""
    order = torch.rand(batch, num_cells, generator=generator).argsort(dim=1)
    return _mask_ranks(order, math.floor(ratio * num_cells)).to(device)


def _mask_ranks(order: torch.Tensor, count: int) -> torch.Tensor:
    """Mask the cells ``order[:, :count]`` of a (B, N) ranking."""
    mask = torch.zeros(order.shape, dtype=torch.bool, device=order.device)
    mask.scatter_(1, order[:, :count], True)
    return mask


def block_mask(
    batch: int,
    grid: tuple[int, int, int],
    ratio: float,
    min_cells: int = 4,
    min_aspect: float = 0.3,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    attempts: int = 10,
) -> torch.Tensor:
    """iBOT's block masking extended to three axes: mask boxes of contiguous cells until floor(ratio N).

    Each box draws a volume v uniformly from [min_cells, cells still to mask] and two aspect ratios
    a_x = s_x / s_z and a_y = s_y / s_z log-uniformly from [min_aspect, 1 / min_aspect], so that
    s_z = (v / (a_x a_y))^(1/3). A box is kept when it masks at least one new cell and no more than are
    still needed. When no box fits after ``attempts`` tries, single cells next to the masked ones are
    added, so every image gets exactly floor(ratio N) masked cells and every added cell touches a block.

    Returns:
        (B, N) bool in raster order of ``grid``.
    """
    num_cells = grid[0] * grid[1] * grid[2]
    target = math.floor(ratio * num_cells)
    log_low, log_high = math.log(min_aspect), math.log(1.0 / min_aspect)
    masks = torch.zeros(batch, *grid, dtype=torch.bool)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    for image in range(batch):
        mask = masks[image]
        while int(mask.sum()) < target:
            remaining = target - int(mask.sum())
            placed = False
            for _ in range(attempts):
                volume = uniform(min(min_cells, remaining), remaining)
                aspect_x, aspect_y = math.exp(uniform(log_low, log_high)), math.exp(uniform(log_low, log_high))
                side_z = (volume / (aspect_x * aspect_y)) ** (1.0 / 3.0)
                sides = [
                    min(max(round(side), 1), size) for side, size in zip((aspect_x * side_z, aspect_y * side_z, side_z), grid)
                ]
                corner = [int(torch.randint(0, size - side + 1, (), generator=generator)) for side, size in zip(sides, grid)]
                box = tuple(slice(start, start + side) for start, side in zip(corner, sides))
                new_cells = int((~mask[box]).sum())
                if 0 < new_cells <= remaining:
                    mask[box] = True
                    placed = True
                    break
            if not placed:
                _grow(mask, remaining, generator)
    return masks.flatten(1).to(device)


def _grow(mask: torch.Tensor, count: int, generator: torch.Generator | None) -> None:
    """Mask up to ``count`` unmasked cells that share a face with a masked one (any cell if none is masked)."""
    if not bool(mask.any()):
        candidates = torch.ones_like(mask)
    else:
        cross = torch.zeros(3, 3, 3)
        cross[1, 1, :] = cross[1, :, 1] = cross[:, 1, 1] = 1.0
        neighbours = F.conv3d(mask[None, None].float(), cross[None, None], padding=1)[0, 0] > 0
        candidates = neighbours & ~mask
    flat = candidates.flatten().nonzero().flatten()
    chosen = flat[torch.randperm(flat.numel(), generator=generator)[:count]]
    mask.view(-1)[chosen] = True


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


def cell_dropout(
    batch: int,
    cell_grid: tuple[int, int, int],
    patch_grid: tuple[int, int, int],
    ratio: float,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw the noisy teacher's dropout on the cell grid: floor(ratio N) whole cells of each view.

    Returns:
        (B, p_x, p_y, p_z) bool on the patch grid, True for zeroed patch embeddings.
    """
    cells = patch_dropout(batch, cell_grid, ratio, generator=generator)
    factor = patch_grid[0] // cell_grid[0]
    for axis in (1, 2, 3):
        cells = cells.repeat_interleave(factor, dim=axis)
    return cells.to(device)


def cells_to_voxels(cell_mask: torch.Tensor, cell_voxels: int) -> torch.Tensor:
    """Expand a (B, n_x, n_y, n_z) cell mask to a (B, 1, X, Y, Z) float voxel mask."""
    voxels = cell_mask[:, None].float()
    for axis in (2, 3, 4):
        voxels = voxels.repeat_interleave(cell_voxels, dim=axis)
    return voxels
