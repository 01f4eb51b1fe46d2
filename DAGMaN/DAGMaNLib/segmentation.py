"""Conversion of the child's ``segmentation.nrrd`` label map into a named, colored segmentation node."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import slicer
import slicer.util
import vtk

from .errors import InferenceError, ResultFormatError
from .results import LabelInfo
from .terminology import serialize_terminology
from .volume_io import read_volume_file

logger = logging.getLogger(__name__)


def create_segmentation_node(
    scene, labelmap_path: Path, labels: Sequence[LabelInfo], reference_volume_node, name: str
):
    """Create a ``vtkMRMLSegmentationNode`` from the uint8 label map at ``labelmap_path``.

    Every label in ``labels`` becomes one segment with its name, color and terminology, also
    when no voxel has its value, so an empty segment shows the user that the model found nothing.
    A voxel value that ``labels`` does not list becomes a segment named "Label N", with a
    warning. The reference image geometry is set from ``reference_volume_node``. The
    temporary label map node is removed before returning.
    """
    labelmap_node = read_volume_file(scene, labelmap_path, "vtkMRMLLabelMapVolumeNode", f"{name} labelmap")
    segmentation_node = None
    try:
        present_values = _present_label_values(labelmap_node, labelmap_path)

        segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", scene.GenerateUniqueName(name))
        segmentation_node.CreateDefaultDisplayNodes()
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
        _import_labelmap(labelmap_node, segmentation_node, labels, present_values)
        return segmentation_node
    except Exception:
        if segmentation_node is not None:
            scene.RemoveNode(segmentation_node)
        raise
    finally:
        scene.RemoveNode(labelmap_node)


def _present_label_values(labelmap_node, labelmap_path: Path) -> set[int]:
    voxels = slicer.util.arrayFromVolume(labelmap_node)
    if not np.issubdtype(voxels.dtype, np.integer):
        raise ResultFormatError(f"{labelmap_path} has voxel type {voxels.dtype}; the segmentation must be uint8 labels")
    values = {int(value) for value in np.unique(voxels)}
    negative = sorted(value for value in values if value < 0)
    if negative:
        raise ResultFormatError(f"{labelmap_path} contains negative label values {negative}; labels must be 0..255")
    values.discard(0)
    return values


def _import_labelmap(labelmap_node, segmentation_node, labels: Sequence[LabelInfo], present_values: set[int]) -> None:
    """Import all label values at once into pre-made segments.

    ``ImportLabelmapToSegmentationNode`` with a list of segment IDs puts label value ``v``
    into the ``v - 1``-th listed segment, so the list covers every value from 1 to the
    largest one. Placeholder segments for values that are neither listed nor present are
    removed afterwards.
    """
    segmentation = segmentation_node.GetSegmentation()
    labels_by_value = {label.value: label for label in labels}
    max_value = max([*labels_by_value, *present_values], default=0)

    segment_ids = vtk.vtkStringArray()
    placeholder_ids = []
    for value in range(1, max_value + 1):
        label = labels_by_value.get(value)
        if label is not None:
            segment_id = _add_empty_segment(segmentation, label.name, list(label.color))
            segment = segmentation.GetSegment(segment_id)
            if label.terminology is not None:
                try:
                    segment.SetTerminology(serialize_terminology(label.terminology, f"label {value} terminology"))
                except ValueError as error:
                    raise ResultFormatError(f"result.json: {error}") from error
        else:
            segment_id = _add_empty_segment(segmentation, f"Label {value}")
            if value in present_values:
                logger.warning("Label value %d occurs in the segmentation but result.json does not name it", value)
            else:
                placeholder_ids.append(segment_id)
        segment_ids.InsertNextValue(segment_id)

    if max_value > 0 and not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap_node, segmentation_node, segment_ids
    ):
        raise ResultFormatError(f"Could not import label map {labelmap_node.GetName()!r} into a segmentation")

    for segment_id in placeholder_ids:
        segmentation.RemoveSegment(segment_id)


def _add_empty_segment(segmentation, name: str, color=None) -> str:
    segment_id = segmentation.AddEmptySegment(name, name, color) if color else segmentation.AddEmptySegment(name, name)
    if not segment_id:
        # AddEmptySegment fails when no converter rules are registered, which the
        # Segmentations module logic does when it is attached to the scene.
        raise InferenceError(
            f"Could not add segment {name!r}: the Segmentations module logic is not set up for this scene"
        )
    return segment_id
