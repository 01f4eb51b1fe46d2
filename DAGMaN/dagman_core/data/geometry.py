"""Resampling between a scan's own voxel grid and the RAS-aligned isotropic grid of the network.

The network always works on a grid whose axes point to patient Right, Anterior and Superior (RAS),
with isotropic spacing, and whose voxel centres sit on a fixed lattice in world coordinates
(multiples of the spacing). A CT stored flipped or with permuted axes therefore maps onto the same
network grid voxel for voxel, and an oblique CT onto the same lattice, so its results match up to
interpolation. Results are resampled back onto the input's exact grid.
"""

from __future__ import annotations

import itertools

import numpy as np
import SimpleITK as sitk
import torch

# SimpleITK works in LPS coordinates: RAS axes are LPS axes with x and y negated.
RAS_DIRECTION_LPS = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
AIR_HU = -1024.0


def physical_corners(image: sitk.Image) -> np.ndarray:
    """Return the LPS positions (mm) of the 8 corner voxel centres of ``image``, shape (8, 3)."""
    size = image.GetSize()
    corners = []
    for index in itertools.product(*[(0, extent - 1) for extent in size]):
        corners.append(image.TransformIndexToPhysicalPoint([int(value) for value in index]))
    return np.asarray(corners, dtype=np.float64)


def ras_grid_for(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Build an empty RAS-aligned reference grid that covers ``image`` with isotropic ``spacing_mm``.

    Voxel centres lie on multiples of ``spacing_mm`` in world coordinates, so two scans of the same
    anatomy stored in different voxel orders get the same grid.
    """
    if spacing_mm <= 0:
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")

    corners = physical_corners(image)
    lower = corners.min(axis=0)
    upper = corners.max(axis=0)

    # Along LPS x and y the RAS axes point to decreasing coordinates, so the grid starts at the maximum.
    start = np.array(
        [
            np.ceil(upper[0] / spacing_mm - 1e-6) * spacing_mm,
            np.ceil(upper[1] / spacing_mm - 1e-6) * spacing_mm,
            np.floor(lower[2] / spacing_mm + 1e-6) * spacing_mm,
        ]
    )
    end = np.array(
        [
            np.floor(lower[0] / spacing_mm + 1e-6) * spacing_mm,
            np.floor(lower[1] / spacing_mm + 1e-6) * spacing_mm,
            np.ceil(upper[2] / spacing_mm - 1e-6) * spacing_mm,
        ]
    )
    size = [int(round(abs(end[axis] - start[axis]) / spacing_mm)) + 1 for axis in range(3)]

    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([float(spacing_mm)] * 3)
    grid.SetOrigin([float(value) for value in start])
    grid.SetDirection(RAS_DIRECTION_LPS)
    return grid


def resample_to_ras(
    image: sitk.Image,
    spacing_mm: float,
    is_label: bool = False,
    default_value: float | None = None,
) -> sitk.Image:
    """Resample ``image`` onto its RAS-aligned isotropic grid (linear for intensities, nearest for labels).

    Args:
        image: the scan on its own grid; CT intensities in HU.
        spacing_mm: the isotropic output spacing in mm.
        is_label: use nearest-neighbour interpolation and keep the integer pixel type.
        default_value: the value outside the scan for labels (0); intensities repeat the nearest edge voxel.
    """
    grid = ras_grid_for(image, spacing_mm)
    if is_label:
        return sitk.Resample(
            image, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0.0 if default_value is None else default_value, sitk.sitkUInt8
        )

    # Intensities past the scan's edge repeat the nearest edge voxel: an abrupt slab of air where the
    # grid overhangs the scan would look like anatomy the network never saw in training.
    default_value = AIR_HU if default_value is None else default_value
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, float(default_value), sitk.sitkFloat32, True)


def resample_to_reference(
    image: sitk.Image, reference: sitk.Image, is_label: bool = False, default_value: float = 0.0
) -> sitk.Image:
    """Resample ``image`` onto the exact grid of ``reference`` (its size, spacing, origin and direction)."""
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    pixel_type = image.GetPixelID()
    result = sitk.Resample(image, reference, sitk.Transform(), interpolator, float(default_value), pixel_type)
    result.CopyInformation(reference)
    return result


def image_to_tensor_ijk(image: sitk.Image) -> torch.Tensor:
    """Return the voxels of ``image`` as a float32 tensor of shape (1, I, J, K) (channel first, MONAI order)."""
    array_kji = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(array_kji.transpose(2, 1, 0)))[None]


def tensor_ijk_to_image(tensor: torch.Tensor | np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a (I, J, K) tensor or array as an image on ``reference``'s grid."""
    array = tensor.detach().cpu().numpy() if isinstance(tensor, torch.Tensor) else np.asarray(tensor)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    if image.GetSize() != reference.GetSize():
        raise ValueError(f"array of size {image.GetSize()} (I, J, K) does not match reference size {reference.GetSize()}")
    image.CopyInformation(reference)
    return image


def ras_affine(image: sitk.Image) -> np.ndarray:
    """Return the 4x4 IJK-to-RAS matrix (mm) of ``image``."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])

    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ origin
    return affine


def cell_grid_image(
    ras_grid: sitk.Image, cell_voxels: int, cells_ijk: tuple[int, int, int], start_ijk: tuple[int, int, int] = (0, 0, 0)
) -> sitk.Image:
    """Build an empty image for a grid of cells of ``cell_voxels`` network voxels each, over ``ras_grid``.

    Cell centres follow the voxel-centre convention of ``interpolate(align_corners=False)``: the first
    cell's centre is at network voxel ``start_ijk + (cell_voxels - 1) / 2``. ``start_ijk`` is the first
    voxel of a crop on ``ras_grid`` (it may lie outside the grid).
    """
    spacing = np.asarray(ras_grid.GetSpacing())
    first_centre = ras_grid.TransformContinuousIndexToPhysicalPoint([start + (cell_voxels - 1) / 2.0 for start in start_ijk])
    cells = sitk.Image([int(value) for value in cells_ijk], sitk.sitkFloat32)
    cells.SetSpacing([float(value) for value in spacing * cell_voxels])
    cells.SetOrigin(first_centre)
    cells.SetDirection(ras_grid.GetDirection())
    return cells
