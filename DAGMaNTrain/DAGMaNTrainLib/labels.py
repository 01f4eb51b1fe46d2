"""Label values for segment names, and conversion of a segmentation into a uint8 label array."""

from __future__ import annotations

import logging
from typing import Iterable, Mapping

import numpy as np
import slicer
import slicer.util
import vtk

logger = logging.getLogger(__name__)

MAX_LABEL_VALUE = 255  # label maps are written as uint8


def segment_names(segmentation_node) -> list[str]:
    """Return the segment names of ``segmentation_node`` in the segmentation's order."""
    segmentation = segmentation_node.GetSegmentation()
    return [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]


def assign_label_values(segmentation_nodes: Iterable, label_names: Iterable[str] | None = None) -> dict[str, int]:
    """Map each segment name to a label value 1, 2, ... in a stable order.

    With ``label_names`` the order is that list, and segments with other names are skipped
    during export. Without it the order is that of first appearance: the first segmentation's
    segments in their order, then new names of the next segmentation, and so on. The same
    name always gets the same value across cases.
    """
    if label_names is not None:
        ordered = list(dict.fromkeys(label_names))
    else:
        ordered = []
        for segmentation_node in segmentation_nodes:
            for name in segment_names(segmentation_node):
                if name not in ordered:
                    ordered.append(name)
    if not ordered:
        raise ValueError("The selected segmentations contain no segments; add at least one segment")
    if len(ordered) > MAX_LABEL_VALUE:
        raise ValueError(f"{len(ordered)} distinct segment names exceed the {MAX_LABEL_VALUE} labels of a uint8 label map")
    return {name: value for value, name in enumerate(ordered, start=1)}


def segmentation_to_label_array(segmentation_node, reference_volume_node, label_values: Mapping[str, int]) -> np.ndarray:
    """Return a uint8 label array on ``reference_volume_node``'s voxel grid, shape (K, J, I).

    Each segment is exported on its own onto the reference geometry, through the segmentation
    node's parent transform if it has one, and its voxels get the value of its name in
    ``label_values``. Segments are painted in increasing value order, so
    where segments overlap the higher value wins, with a warning for each overlap. Segments
    whose names are not in ``label_values`` are skipped with a warning.
    """
    scene = reference_volume_node.GetScene()
    segmentation = segmentation_node.GetSegmentation()
    dimensions_ijk = reference_volume_node.GetImageData().GetDimensions()
    labels = np.zeros(tuple(reversed(dimensions_ijk)), dtype=np.uint8)

    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        name = segmentation.GetNthSegment(index).GetName()
        if name not in label_values:
            logger.warning("Segment %r of %r has no label value and is not exported", name, segmentation_node.GetName())
            continue
        segments.append((label_values[name], segmentation.GetNthSegmentID(index), name))
    segments.sort(key=lambda item: item[0])

    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("export"))
    try:
        for value, segment_id, name in segments:
            segment_ids = vtk.vtkStringArray()
            segment_ids.InsertNextValue(segment_id)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node,
                segment_ids,
                labelmap_node,
                reference_volume_node,
                slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
            ):
                raise RuntimeError(f"Could not export segment {name!r} of {segmentation_node.GetName()!r} to a label map")
            mask = slicer.util.arrayFromVolume(labelmap_node) != 0
            if mask.shape != labels.shape:
                raise RuntimeError(
                    f"Segment {name!r} exported with shape {mask.shape}, not the reference shape {labels.shape}"
                )

            overlap = int(np.count_nonzero(mask & (labels != 0)))
            if overlap:
                logger.warning(
                    "Segment %r of %r overlaps lower labels in %d voxels; those voxels get label %d",
                    name,
                    segmentation_node.GetName(),
                    overlap,
                    value,
                )
            labels[mask] = value
    finally:
        scene.RemoveNode(labelmap_node)
    return labels
