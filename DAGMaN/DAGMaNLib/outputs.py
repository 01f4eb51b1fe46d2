"""Loading of a finished run's segmentation and attention map into the scene."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import slicer
import slicer.util
import vtk

from .display import (
    add_color_legend,
    configure_attention_display,
    get_or_create_inferno_color_table,
    show_in_slice_views,
)
from .errors import ResultFormatError
from .results import InferenceResult
from .segmentation import create_segmentation_node
from .volume_io import read_volume_file

logger = logging.getLogger(__name__)

ATTRIBUTE_MODEL_NAME = "DAGMaN.ModelName"
ATTRIBUTE_MODEL_SHA256 = "DAGMaN.ModelSHA256"
ATTRIBUTE_LAYER = "DAGMaN.Layer"
ATTRIBUTE_DEVICE = "DAGMaN.Device"
ATTRIBUTE_SOURCE_VOLUME = "DAGMaN.SourceVolumeID"
ATTRIBUTE_PREDICTED_CLASS = "DAGMaN.PredictedClass"
ATTRIBUTE_PROBABILITY_PREFIX = "DAGMaN.Probability."
LAYER_SEGMENTATION = "segmentation"
LAYER_ATTENTION = "attention"
LAYER_CLASSIFICATION = "classification"
TABLE_COLUMNS = ("Model", "Class", "Probability")

GEOMETRY_TOLERANCE_MM = 1e-3


@dataclass
class InferenceOutputs:
    """The nodes that one successful run added to the scene, and its parsed ``result.json``.

    A segmentation model gives ``segmentation_node``; a classification model gives ``table_node``
    (one row per class: model, class, probability) instead.
    """

    segmentation_node: object
    attention_node: object
    result: InferenceResult
    table_node: object = None

    @property
    def summary(self) -> str:
        """Return one line for the status bar: the predicted class and its probability, or the segment count."""
        if self.table_node is not None:
            return f"{self.result.predicted} (probability {self.result.probabilities[self.result.predicted]:.2f})"
        return f"{self.segmentation_node.GetSegmentation().GetNumberOfSegments()} segments"


def load_outputs(
    volume_node, result: InferenceResult, attention_threshold: float, attention_opacity: float
) -> InferenceOutputs:
    """Add the result nodes of ``result`` to ``volume_node``'s scene: the attention volume, and the
    segmentation node of a segmentation model or the probability table of a classification model.

    Every node gets the model name, model SHA-256, device, source volume ID and its layer
    (``"segmentation"``, ``"classification"`` or ``"attention"``) as node attributes, the CT's
    parent transform and its subject hierarchy folder. A classification's predicted class and
    probabilities are also attributes of the table and attention nodes. The attention map is shown
    as foreground over the CT in every slice view that exists. If anything fails, the nodes added so
    far are removed.
    """
    scene = volume_node.GetScene()
    base_name = volume_node.GetName() or "Volume"
    added_nodes = []
    try:
        if result.task == "classification":
            segmentation_node = None
            table_node = create_probability_table(scene, result, f"{base_name} DAGMaN classification")
            first_node, first_layer = table_node, LAYER_CLASSIFICATION
        else:
            table_node = None
            segmentation_node = create_segmentation_node(
                scene, result.segmentation_path, result.labels, volume_node, f"{base_name} DAGMaN segmentation"
            )
            first_node, first_layer = segmentation_node, LAYER_SEGMENTATION
        added_nodes.append(first_node)

        attention_node = read_volume_file(
            scene, result.attention_path, "vtkMRMLScalarVolumeNode", f"{base_name} DAGMaN attention"
        )
        added_nodes.append(attention_node)
        _ensure_float32(attention_node)
        _check_geometry(volume_node, attention_node, result.attention_path)

        color_node = get_or_create_inferno_color_table(scene)
        configure_attention_display(attention_node, color_node, attention_threshold)
        add_color_legend(attention_node)

        for node, layer in ((first_node, first_layer), (attention_node, LAYER_ATTENTION)):
            _set_attributes(node, result, layer, volume_node)
            if table_node is None:
                node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
            _place_next_to(node, volume_node)
        if table_node is not None:
            attention_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())

        views = show_in_slice_views(scene, volume_node, attention_node, attention_opacity)
        if table_node is not None:
            summary = f"class {result.predicted!r} at probability {result.probabilities[result.predicted]:.3f}"
        else:
            summary = f"{segmentation_node.GetSegmentation().GetNumberOfSegments()} segments"
        logger.info("Loaded DAGMaN results for %r: %s, attention map shown in %d slice views", base_name, summary, views)
        return InferenceOutputs(
            segmentation_node=segmentation_node, attention_node=attention_node, result=result, table_node=table_node
        )
    except Exception:
        for node in added_nodes:
            scene.RemoveNode(node)
        raise


def _ensure_float32(attention_node) -> None:
    voxels = slicer.util.arrayFromVolume(attention_node)
    if not np.issubdtype(voxels.dtype, np.floating):
        raise ResultFormatError(
            f"The attention map has voxel type {voxels.dtype}; it must be float32 values in [0, 1]"
        )
    low, high = float(voxels.min()), float(voxels.max())
    if low < 0.0 or high > 1.0:
        logger.warning("Attention values span [%g, %g], outside the expected [0, 1]", low, high)
    if voxels.dtype != np.float32:
        slicer.util.updateVolumeFromArray(attention_node, voxels.astype(np.float32))


def _check_geometry(volume_node, output_node, path) -> None:
    """Log a warning when an output is not on the input's voxel grid (it still displays correctly)."""
    input_matrix = vtk.vtkMatrix4x4()
    output_matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(input_matrix)
    output_node.GetIJKToRASMatrix(output_matrix)
    same_matrix = np.allclose(
        slicer.util.arrayFromVTKMatrix(input_matrix),
        slicer.util.arrayFromVTKMatrix(output_matrix),
        atol=GEOMETRY_TOLERANCE_MM,
    )
    same_dimensions = volume_node.GetImageData().GetDimensions() == output_node.GetImageData().GetDimensions()
    if not (same_matrix and same_dimensions):
        logger.warning(
            "%s is not on the input volume's voxel grid (dimensions %s vs %s); Slicer resamples it for display",
            path,
            output_node.GetImageData().GetDimensions(),
            volume_node.GetImageData().GetDimensions(),
        )


RESULT_NODE_CLASSES = ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode", "vtkMRMLTableNode")


def remove_previous_results(volume_node, model_sha256: str, keep=()) -> int:
    """Remove the result nodes of earlier runs of one model (by SHA-256) on ``volume_node``; return how many.

    Nodes in ``keep`` (the new run's) stay, and so do the results of other models or other volumes.
    """
    scene = volume_node.GetScene()
    keep_ids = {node.GetID() for node in keep if node is not None}
    previous = []
    for class_name in RESULT_NODE_CLASSES:
        for index in range(scene.GetNumberOfNodesByClass(class_name)):
            node = scene.GetNthNodeByClass(index, class_name)
            if (
                node.GetID() not in keep_ids
                and node.GetAttribute(ATTRIBUTE_SOURCE_VOLUME) == volume_node.GetID()
                and node.GetAttribute(ATTRIBUTE_MODEL_SHA256) == model_sha256
            ):
                previous.append(node)
    for node in previous:
        if hasattr(node, "GetNumberOfDisplayNodes"):
            for display_node in [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]:
                if display_node is not None:
                    scene.RemoveNode(display_node)
        scene.RemoveNode(node)
    if previous:
        logger.info("Removed %d result nodes of an earlier run of the same model on %r", len(previous), volume_node.GetName())
    return len(previous)


def create_probability_table(scene, result: InferenceResult, name: str):
    """Add a table node with one row per class: the model's name, the class name and its probability."""
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    model_column, class_column = vtk.vtkStringArray(), vtk.vtkStringArray()
    probability_column = vtk.vtkDoubleArray()
    for column, title in zip((model_column, class_column, probability_column), TABLE_COLUMNS):
        column.SetName(title)
        table.AddColumn(column)
    for label in result.labels:
        row = table.InsertNextBlankRow()
        table.SetValue(row, 0, vtk.vtkVariant(result.model_name))
        table.SetValue(row, 1, vtk.vtkVariant(label.name))
        table.SetValue(row, 2, vtk.vtkVariant(result.probabilities[label.name]))
    table_node.Modified()
    return table_node


def _set_attributes(node, result: InferenceResult, layer: str, volume_node) -> None:
    node.SetAttribute(ATTRIBUTE_MODEL_NAME, result.model_name)
    node.SetAttribute(ATTRIBUTE_MODEL_SHA256, result.model_sha256)
    node.SetAttribute(ATTRIBUTE_LAYER, layer)
    node.SetAttribute(ATTRIBUTE_DEVICE, result.device)
    node.SetAttribute(ATTRIBUTE_SOURCE_VOLUME, volume_node.GetID())
    if result.task == "classification":
        node.SetAttribute(ATTRIBUTE_PREDICTED_CLASS, result.predicted)
        for name, probability in result.probabilities.items():
            node.SetAttribute(f"{ATTRIBUTE_PROBABILITY_PREFIX}{name}", f"{probability:.6f}")


def _place_next_to(node, volume_node) -> None:
    """Move ``node`` into the subject hierarchy folder (patient, study) that contains ``volume_node``."""
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(volume_node.GetScene())
    if hierarchy is None:
        return
    volume_item = hierarchy.GetItemByDataNode(volume_node)
    node_item = hierarchy.GetItemByDataNode(node)
    if volume_item and node_item:
        hierarchy.SetItemParent(node_item, hierarchy.GetItemParent(volume_item))
