"""Display of the attention map: an Inferno color table built in code, display settings, slice view layers.

Slicer does not ship matplotlib's Inferno as a color table, and file-based color tables
are not available under slicer-core, so the table is interpolated from 17 anchor colors.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

logger = logging.getLogger(__name__)

COLOR_TABLE_NAME = "DAGMaN Inferno"
COLOR_TABLE_ATTRIBUTE = "DAGMaN.ColorTable"
COLOR_TABLE_SIZE = 256

# (position, red, green, blue) samples of matplotlib's "inferno" colormap (CC0), 4 decimals.
INFERNO_ANCHORS = (
    (0.0000, 0.0015, 0.0005, 0.0139),
    (0.0625, 0.0423, 0.0281, 0.1411),
    (0.1250, 0.1293, 0.0473, 0.2908),
    (0.1875, 0.2383, 0.0366, 0.3964),
    (0.2500, 0.3415, 0.0623, 0.4294),
    (0.3125, 0.4412, 0.0993, 0.4316),
    (0.3750, 0.5409, 0.1347, 0.4151),
    (0.4375, 0.6401, 0.1714, 0.3811),
    (0.5000, 0.7357, 0.2159, 0.3302),
    (0.5625, 0.8224, 0.2752, 0.2661),
    (0.6250, 0.8943, 0.3534, 0.1936),
    (0.6875, 0.9470, 0.4492, 0.1153),
    (0.7500, 0.9784, 0.5579, 0.0349),
    (0.8125, 0.9879, 0.6753, 0.0653),
    (0.8750, 0.9746, 0.7977, 0.2063),
    (0.9375, 0.9476, 0.9174, 0.4107),
    (1.0000, 0.9884, 0.9984, 0.6449),
)

ATTENTION_WINDOW = (0.0, 1.0)
DEFAULT_LOWER_THRESHOLD = 0.25
DEFAULT_FOREGROUND_OPACITY = 0.5


def inferno_colors(size: int = COLOR_TABLE_SIZE) -> np.ndarray:
    """Return ``size`` x 3 RGB colors in [0, 1], linearly interpolated between the Inferno anchors."""
    anchors = np.asarray(INFERNO_ANCHORS)
    positions = np.linspace(0.0, 1.0, size)
    return np.stack([np.interp(positions, anchors[:, 0], anchors[:, channel]) for channel in (1, 2, 3)], axis=1)


def get_or_create_inferno_color_table(scene):
    """Return the scene's DAGMaN Inferno ``vtkMRMLColorTableNode``, creating it on first use."""
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorTableNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLColorTableNode")
        if node.GetAttribute(COLOR_TABLE_ATTRIBUTE) == "inferno":
            return node

    color_node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", COLOR_TABLE_NAME)
    color_node.SetTypeToUser()
    color_node.SetNumberOfColors(COLOR_TABLE_SIZE)
    for index, (red, green, blue) in enumerate(inferno_colors()):
        color_node.SetColor(index, f"{index / (COLOR_TABLE_SIZE - 1):.3f}", red, green, blue, 1.0)
    color_node.SetAttribute(COLOR_TABLE_ATTRIBUTE, "inferno")
    color_node.SetAttribute("Category", "DAGMaN")
    return color_node


def configure_attention_display(volume_node, color_node, lower_threshold: float = DEFAULT_LOWER_THRESHOLD):
    """Show ``volume_node`` (attention in [0, 1]) with ``color_node``, window 0..1 and a lower threshold.

    Voxels below ``lower_threshold`` are transparent in slice views, so only the attended
    regions cover the CT. Auto window/level and auto threshold are switched off so that Slicer
    does not rescale to the data's own range. Returns the display node.
    """
    if not 0.0 <= lower_threshold < 1.0:
        raise ValueError(f"lower_threshold {lower_threshold} must lie in [0, 1)")

    volume_node.CreateDefaultDisplayNodes()
    display_node = volume_node.GetDisplayNode()
    display_node.SetAndObserveColorNodeID(color_node.GetID())
    display_node.SetAutoWindowLevel(0)
    display_node.SetWindowLevelMinMax(*ATTENTION_WINDOW)
    display_node.SetAutoThreshold(0)
    display_node.SetThreshold(lower_threshold, ATTENTION_WINDOW[1])
    display_node.SetApplyThreshold(1)
    display_node.SetInterpolate(1)
    return display_node


def add_color_legend(volume_node):
    """Add Slicer's default color legend to ``volume_node`` when the Colors module logic is available.

    Returns the legend display node, or ``None`` where there is no Colors module
    (``slicer.modules`` is missing, as under plain slicer-core).
    """
    slicer_module = sys.modules.get("slicer")
    modules = getattr(slicer_module, "modules", None)
    colors_module = getattr(modules, "colors", None)
    if colors_module is None:
        logger.debug("No Colors module logic, so the attention map gets no color legend")
        return None
    return colors_module.logic().AddDefaultColorLegendDisplayNode(volume_node)


def show_in_slice_views(scene, background_node, foreground_node, foreground_opacity: float) -> int:
    """Put ``background_node`` and ``foreground_node`` into every slice view of ``scene``.

    Works on the scene's ``vtkMRMLSliceCompositeNode``s, which exist only where a view layout
    was created (the Slicer application); without them this does nothing. Returns the number
    of slice views that were updated.
    """
    composite_nodes = _slice_composite_nodes(scene)
    for composite_node in composite_nodes:
        composite_node.SetBackgroundVolumeID(background_node.GetID())
        composite_node.SetForegroundVolumeID(foreground_node.GetID())
        composite_node.SetForegroundOpacity(foreground_opacity)
    return len(composite_nodes)


def set_foreground_opacity(scene, opacity: float, foreground_node=None) -> int:
    """Set the foreground opacity (0..1) of the slice views that show ``foreground_node`` (any, if ``None``).

    Returns the number of slice views that were updated.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity {opacity} must lie in [0, 1]")

    updated = 0
    for composite_node in _slice_composite_nodes(scene):
        if foreground_node is not None and composite_node.GetForegroundVolumeID() != foreground_node.GetID():
            continue
        composite_node.SetForegroundOpacity(opacity)
        updated += 1
    return updated


def set_lower_threshold(volume_node, lower_threshold: float) -> None:
    """Make attention values below ``lower_threshold`` (0..1) transparent in the slice views."""
    if not 0.0 <= lower_threshold < 1.0:
        raise ValueError(f"invalid lower_threshold {lower_threshold}; give a value in [0, 1)")
    display_node = volume_node.GetDisplayNode()
    if display_node is None:
        raise ValueError(f"Volume {volume_node.GetName()!r} has no display node; show it once before thresholding")
    display_node.SetThreshold(lower_threshold, ATTENTION_WINDOW[1])
    display_node.SetApplyThreshold(1)


def set_foreground_visible(scene, foreground_node, visible: bool, opacity: float) -> int:
    """Show ``foreground_node`` over the CT in every slice view, or take it out of the views showing it.

    Its color legend, where it has one, is shown or hidden with it. Returns the number of slice
    views that changed.
    """
    updated = 0
    for composite_node in _slice_composite_nodes(scene):
        showing = composite_node.GetForegroundVolumeID() == foreground_node.GetID()
        if visible and not showing:
            composite_node.SetForegroundVolumeID(foreground_node.GetID())
            composite_node.SetForegroundOpacity(opacity)
            updated += 1
        elif not visible and showing:
            composite_node.SetForegroundVolumeID(None)
            updated += 1

    for index in range(foreground_node.GetNumberOfDisplayNodes()):
        display_node = foreground_node.GetNthDisplayNode(index)
        if display_node is not None and display_node.IsA("vtkMRMLColorLegendDisplayNode"):
            display_node.SetVisibility(visible)
    return updated


def _slice_composite_nodes(scene) -> list:
    return [
        scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]
