"""Pytest fixtures that give the Slicer-side tests a real MRML scene from slicer-core.

Test modules import the fixtures they use from this module. Importing it puts the DAGMaN and
DAGMaNTrain module folders on ``sys.path``, as Slicer does for scripted modules. slicer-core has
Slicer's MRML classes and module logics but no application, so ``slicer.mrmlScene`` and
``slicer.modules`` are created here, the way the Slicer application sets them up.
"""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DAGMAN_MODULE_DIR = REPO_ROOT / "DAGMaN"
DAGMAN_TRAIN_MODULE_DIR = REPO_ROOT / "DAGMaNTrain"

for _module_dir in (DAGMAN_MODULE_DIR, DAGMAN_TRAIN_MODULE_DIR):
    if str(_module_dir) not in sys.path:
        sys.path.insert(0, str(_module_dir))

import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402

SLICE_VIEW_NAMES = ("Red", "Yellow", "Green")


def find_ct_data_dir() -> Path | None:
    """Return the real-CT folder, or ``None`` when it is absent.

    ``DAGMAN_TEST_DATA`` names it when set (as in conftest.py); otherwise it is
    ``shared/data/ct`` inside or beside the repository.
    """
    candidates = [REPO_ROOT / "shared" / "data" / "ct", REPO_ROOT.parent / "shared" / "data" / "ct"]
    if os.environ.get("DAGMAN_TEST_DATA"):
        candidates = [Path(os.environ["DAGMAN_TEST_DATA"])]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return None


class SlicerTestScene:
    """A ``vtkMRMLScene`` with an application logic and the Colors, Volumes and Segmentations logics.

    ``install()`` points ``slicer.mrmlScene`` and ``slicer.modules`` at them, the way the
    Slicer application does; ``uninstall()`` restores what was there before.
    """

    def __init__(self, home_dir: Path):
        (home_dir / "share" / "ColorFiles").mkdir(parents=True, exist_ok=True)
        self.scene = slicer.vtkMRMLScene()
        self.application_logic = slicer.vtkSlicerApplicationLogic()
        self.application_logic.SetMRMLScene(self.scene)
        self.application_logic.SetHomeDirectory(str(home_dir))
        self.application_logic.SetShareDirectory("share")

        self.logics = {
            "Colors": slicer.vtkSlicerColorLogic(),
            "Volumes": slicer.vtkSlicerVolumesLogic(),
            "Segmentations": slicer.vtkSlicerSegmentationsModuleLogic(),
        }
        for name, logic in self.logics.items():
            logic.SetMRMLApplicationLogic(self.application_logic)
            logic.SetMRMLScene(self.scene)
            self.application_logic.SetModuleLogic(name, logic)
        self._saved: dict = {}

    def install(self) -> None:
        self._saved = {name: getattr(slicer, name) for name in ("mrmlScene", "modules") if hasattr(slicer, name)}
        slicer.mrmlScene = self.scene
        slicer.modules = types.SimpleNamespace(
            **{name.lower(): types.SimpleNamespace(logic=lambda logic=logic: logic) for name, logic in self.logics.items()}
        )

    def uninstall(self) -> None:
        for name in ("mrmlScene", "modules"):
            if hasattr(slicer, name):
                delattr(slicer, name)
        for name, value in self._saved.items():
            setattr(slicer, name, value)
        self.scene.Clear(1)


@pytest.fixture
def slicer_scene(tmp_path_factory):
    """Return a fresh ``vtkMRMLScene`` set up as in ``SlicerTestScene``, installed as ``slicer.mrmlScene``."""
    test_scene = SlicerTestScene(tmp_path_factory.mktemp("slicer-home"))
    test_scene.install()
    try:
        yield test_scene.scene
    finally:
        test_scene.uninstall()


@pytest.fixture
def slicer_scene_with_views(slicer_scene):
    """Return ``slicer_scene`` with the three slice composite nodes that Slicer's layout creates."""
    for view_name in SLICE_VIEW_NAMES:
        composite_node = slicer.vtkMRMLSliceCompositeNode()
        composite_node.SetLayoutName(view_name)
        composite_node.SetSingletonTag(view_name)
        slicer_scene.AddNode(composite_node)
    return slicer_scene


def ijk_to_ras_array(volume_node) -> np.ndarray:
    """Return the node's 4 x 4 IJK-to-RAS matrix as a numpy array."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def oblique_directions(angle_z_rad: float = 0.3, angle_x_rad: float = 0.2) -> np.ndarray:
    """Return a 3 x 3 rotation (about the S axis, then the R axis): columns are the I, J, K directions in RAS."""
    cz, sz = np.cos(angle_z_rad), np.sin(angle_z_rad)
    cx, sx = np.cos(angle_x_rad), np.sin(angle_x_rad)
    rotation_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    rotation_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    return rotation_x @ rotation_z
