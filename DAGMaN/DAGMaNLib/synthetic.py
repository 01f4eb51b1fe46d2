"""A small synthetic chest CT volume node, for the module's self-test and the pytest suite."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import slicer.util

AIR_HU = -1000
LUNG_HU = -850
SOFT_TISSUE_HU = 40
TUMOR_HU = 60


def synthetic_chest_ct(shape_kji: Sequence[int] = (24, 48, 48), seed: int = 0) -> np.ndarray:
    """Return an int16 CT array in HU, shape (slices, rows, columns): a body with two lungs and a tumor.

    Positions are fractions of the array size, so any shape from about 8 x 16 x 16 up works.
    """
    slices, rows, columns = (int(size) for size in shape_kji)
    k, j, i = np.meshgrid(
        np.linspace(-1.0, 1.0, slices), np.linspace(-1.0, 1.0, rows), np.linspace(-1.0, 1.0, columns), indexing="ij"
    )
    rng = np.random.default_rng(seed)
    volume = np.full((slices, rows, columns), AIR_HU, dtype=np.float32)

    body = (i / 0.9) ** 2 + (j / 0.7) ** 2 <= 1.0
    volume[body] = SOFT_TISSUE_HU
    for center in (-0.42, 0.42):
        lung = ((i - center) / 0.32) ** 2 + (j / 0.5) ** 2 + (k / 0.95) ** 2 <= 1.0
        volume[lung] = LUNG_HU
    tumor = ((i - 0.42) / 0.12) ** 2 + ((j + 0.1) / 0.15) ** 2 + (k / 0.3) ** 2 <= 1.0
    volume[tumor] = TUMOR_HU

    volume += rng.normal(0.0, 15.0, volume.shape).astype(np.float32)
    return np.clip(volume, -1024, 3071).astype(np.int16)


def ijk_to_ras_matrix(
    spacing_mm: Sequence[float], origin_ras_mm: Sequence[float], directions: Optional[np.ndarray] = None
) -> np.ndarray:
    """Return the 4 x 4 IJK-to-RAS matrix. ``directions`` has the RAS unit vectors of the I, J, K axes as columns."""
    direction_matrix = np.eye(3) if directions is None else np.asarray(directions, dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = direction_matrix * np.asarray(spacing_mm, dtype=float)[np.newaxis, :]
    matrix[:3, 3] = np.asarray(origin_ras_mm, dtype=float)
    return matrix


def add_synthetic_ct_volume(
    scene,
    name: str = "DAGMaN synthetic CT",
    shape_kji: Sequence[int] = (24, 48, 48),
    spacing_mm: Sequence[float] = (0.8, 0.8, 2.5),
    origin_ras_mm: Sequence[float] = (-19.0, -19.0, -30.0),
    directions: Optional[np.ndarray] = None,
    seed: int = 0,
):
    """Add a ``vtkMRMLScalarVolumeNode`` with ``synthetic_chest_ct`` voxels to ``scene`` and return it.

    ``spacing_mm`` is (I, J, K) = (column, row, slice) spacing in mm.
    """
    volume_node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName(name))
    volume_node.SetIJKToRASMatrix(
        slicer.util.vtkMatrixFromArray(ijk_to_ras_matrix(spacing_mm, origin_ras_mm, directions))
    )
    slicer.util.updateVolumeFromArray(volume_node, synthetic_chest_ct(shape_kji, seed))
    volume_node.CreateDefaultDisplayNodes()
    return volume_node
