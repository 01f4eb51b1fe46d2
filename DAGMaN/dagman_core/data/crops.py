"""Classification crops: one cube of the network grid centred on a lesion mask, a point or the body."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from .geometry import image_to_tensor_ijk, resample_to_ras, resample_to_reference
from .io import read_image
from .transforms import BODY_THRESHOLD, window_hu

CROP_MODES = ("auto", "mask", "point", "whole")


@dataclass
class Crop:
    """One classification crop on the RAS network grid.

    ``image`` is the windowed crop (1, X, Y, Z) in [0, 1]. ``start_ijk`` is its first voxel on
    ``ras_grid``, negative where the crop reaches past the scan, which is padded with air.
    ``center_ras_mm`` is the chosen centre and ``mode`` how it was chosen (``mask``, ``point`` or ``whole``).
    """

    image: torch.Tensor
    ras_grid: sitk.Image
    start_ijk: tuple[int, int, int]
    center_ras_mm: list[float]
    mode: str

    def describe(self) -> dict:
        """Return the crop's centre, size and mode, as ``result.json`` and ``metrics.json`` report them."""
        spacing = self.ras_grid.GetSpacing()[0]
        return {
            "mode": self.mode,
            "center_ras_mm": [round(value, 2) for value in self.center_ras_mm],
            "size_voxels": list(self.image.shape[1:]),
            "size_mm": [round(size * spacing, 2) for size in self.image.shape[1:]],
        }


def parse_point(text: str) -> list[float]:
    """Read a point given as ``R,A,S`` in mm (the coordinates Slicer shows)."""
    try:
        values = [float(part) for part in str(text).replace(";", ",").split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ValueError(f"invalid point {text!r}; give three comma-separated RAS coordinates in mm, e.g. -40.5,12,-130")
    return values


def resolve_mode(mode: str, mask: object | None, point: object | None) -> str:
    """Return the crop mode to use: ``auto`` picks ``mask``, then ``point``, then ``whole``."""
    if mode not in CROP_MODES:
        raise ValueError(f"invalid crop mode {mode!r}; valid choices: {', '.join(CROP_MODES)}")
    if mode == "auto":
        if mask is not None:
            return "mask"
        if point is not None:
            return "point"
        return "whole"
    if mode == "mask" and mask is None:
        raise ValueError("crop mode 'mask' needs a lesion mask; give the case a 'mask' path or choose 'point' or 'whole'")
    if mode == "point" and point is None:
        raise ValueError("crop mode 'point' needs a point; give the case a 'point' [R, A, S] in mm or choose 'mask' or 'whole'")
    return mode


def _ras_to_index(ras_grid: sitk.Image, point_ras: list[float]) -> np.ndarray:
    lps = (-float(point_ras[0]), -float(point_ras[1]), float(point_ras[2]))
    return np.asarray(ras_grid.TransformPhysicalPointToContinuousIndex(lps))


def _index_to_ras(ras_grid: sitk.Image, index: np.ndarray) -> list[float]:
    lps = ras_grid.TransformContinuousIndexToPhysicalPoint([float(value) for value in index])
    return [-lps[0], -lps[1], lps[2]]


def classification_crop(
    image: sitk.Image | str | os.PathLike,
    spacing_mm: float,
    hu_window: tuple[float, float],
    crop_size: int,
    mode: str = "auto",
    mask: sitk.Image | str | os.PathLike | None = None,
    point_ras: list[float] | None = None,
) -> Crop:
    """Resample a CT onto its RAS grid and cut one ``crop_size``^3 cube around the chosen centre.

    Args:
        image: the CT (HU) or its path.
        spacing_mm: the network grid's isotropic spacing.
        hu_window: the HU range scaled to [0, 1].
        crop_size: the cube's side in network voxels.
        mode: ``mask`` centres the crop on the mask's centre of mass and ``point`` on ``point_ras`` (mm).
            ``whole`` centres it on the body's bounding box (voxels above -500 HU). ``auto`` picks the
            first of these that was given.
        mask: a lesion mask on any grid covering the lesion; nonzero voxels count.
        point_ras: the centre in RAS mm.
    """
    mode = resolve_mode(mode, mask, point_ras)
    image = read_image(image) if not isinstance(image, sitk.Image) else image
    ras_grid = resample_to_ras(image, spacing_mm)
    volume = window_hu(image_to_tensor_ijk(ras_grid)[0], hu_window)

    if mode == "mask":
        mask = read_image(mask) if not isinstance(mask, sitk.Image) else mask
        on_grid = sitk.GetArrayFromImage(resample_to_reference(sitk.Cast(mask != 0, sitk.sitkUInt8), ras_grid, is_label=True))
        voxels = np.argwhere(on_grid.transpose(2, 1, 0) > 0)
        if len(voxels) == 0:
            raise ValueError("the lesion mask has no voxel inside the scan; check that mask and CT belong together")
        center = voxels.mean(axis=0)
    elif mode == "point":
        center = _ras_to_index(ras_grid, point_ras)
        if np.any(center < -0.5) or np.any(center > np.asarray(volume.shape) - 0.5):
            corners = np.asarray([_index_to_ras(ras_grid, np.asarray(index)) for index in ([0, 0, 0], np.asarray(volume.shape) - 1)])
            extent = ", ".join(f"{axis} {low:.0f} to {high:.0f}" for axis, low, high in zip("RAS", corners.min(0), corners.max(0)))
            raise ValueError(f"point {point_ras} (RAS mm) lies outside the scan, which spans {extent} mm; give a point inside the CT")
    else:
        body = np.argwhere(volume.numpy() > BODY_THRESHOLD)
        extent = (body.min(axis=0), body.max(axis=0)) if len(body) else (np.zeros(3), np.asarray(volume.shape) - 1)
        center = (extent[0] + extent[1]) / 2.0

    start = tuple(int(round(value - crop_size / 2.0 + 0.5)) for value in center)
    return Crop(_cut(volume, start, crop_size), ras_grid, start, _index_to_ras(ras_grid, center), mode)


def _cut(volume: torch.Tensor, start: tuple[int, int, int], size: int) -> torch.Tensor:
    """Return the (1, size, size, size) cube of ``volume`` (X, Y, Z) from ``start``, padded with 0 (air)."""
    padding = []
    for axis in reversed(range(3)):
        padding += [max(-start[axis], 0), max(start[axis] + size - volume.shape[axis], 0)]
    padded = F.pad(volume[None, None], padding, value=0.0)[0]
    offsets = [max(-value, 0) + value for value in start]
    return padded[:, offsets[0] : offsets[0] + size, offsets[1] : offsets[1] + size, offsets[2] : offsets[2] + size].contiguous()
