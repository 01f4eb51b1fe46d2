"""Writing and reading volume nodes through Slicer storage nodes (.nrrd, .nii.gz).

Storage nodes keep the full IJK-to-RAS geometry (spacing in mm, origin, direction) and
convert between Slicer's RAS and the files' LPS convention, so they work the same inside
Slicer and under slicer-core, where ``slicer.util.loadVolume`` is not available.
"""

from __future__ import annotations

import logging
from pathlib import Path

import slicer

logger = logging.getLogger(__name__)


def write_volume_node(volume_node, path: Path, compress: bool = False) -> None:
    """Write ``volume_node``'s voxels and geometry to ``path``, in the file type of its extension.

    The node's own storage node is left untouched, so the user's file name is not changed.
    A parent transform of the node is not applied to the written file.
    """
    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage_node.SetFileName(str(path))
    storage_node.SetUseCompression(1 if compress else 0)
    if not storage_node.WriteData(volume_node):
        raise OSError(f"Could not write volume {volume_node.GetName()!r} to {path}; check free disk space and permissions")


def read_volume_file(scene, path: Path, node_class: str, name: str):
    """Read ``path`` into a new node of ``node_class`` added to ``scene``, and return the node.

    The storage node used for reading is removed again, so the node does not point at a
    temporary file. On failure the new node is removed and ``OSError`` is raised.
    """
    volume_node = scene.AddNewNodeByClass(node_class, scene.GenerateUniqueName(name))
    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage_node.SetFileName(str(path))
    storage_node.SetSingleFile(1)
    try:
        ok = storage_node.ReadData(volume_node)
    except Exception:
        scene.RemoveNode(volume_node)
        raise
    if not ok or volume_node.GetImageData() is None:
        scene.RemoveNode(volume_node)
        raise OSError(f"Could not read image file {path} as {node_class}")
    return volume_node
