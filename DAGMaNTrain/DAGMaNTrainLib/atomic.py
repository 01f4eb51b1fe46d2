"""Atomic file writes: write to a temporary name in the target folder, then rename over the target.

A reader never sees a half-written file: the target either keeps its old content or has
the complete new content, and a failed write leaves no temporary file behind.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import slicer


def temporary_sibling(path: Path) -> Path:
    """Return an unused hidden path in ``path``'s folder that keeps ``path``'s extension (.nrrd, .json)."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial{path.suffix}")


def write_volume_node_atomically(volume_node, path: Path, compress: bool = True) -> None:
    """Write ``volume_node`` (voxels and IJK-to-RAS geometry) to ``path`` through a storage node.

    The file type follows ``path``'s extension, which must be one Slicer writes (.nrrd here).
    """
    path = Path(path)
    temporary = temporary_sibling(path)
    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage_node.SetFileName(str(temporary))
    storage_node.SetUseCompression(1 if compress else 0)
    try:
        if not storage_node.WriteData(volume_node):
            raise OSError(f"Could not write volume {volume_node.GetName()!r} to {path}; check free disk space and permissions")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomically(payload: Any, path: Path) -> None:
    """Write ``payload`` as indented UTF-8 JSON to ``path``."""
    path = Path(path)
    temporary = temporary_sibling(path)
    try:
        with open(temporary, "w", encoding="utf-8") as stream:
            json.dump(payload, stream, indent=2)
            stream.write("\n")
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
