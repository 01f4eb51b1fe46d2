"""Three-plane PNG of a CT with an attention heat map and label outlines.

Display conventions (all three images are first put on an LPS-aligned grid):

- axial: radiological view, patient's anterior up and patient's right on
  the viewer's left;
- coronal: seen from the front, superior up, patient's right on the left;
- sagittal: seen from the patient's left, superior up, anterior on the left.

Pixels keep their physical proportions (aspect ratio from the spacing in mm).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke

logger = logging.getLogger(__name__)

WINDOW_HU = 1500.0
LEVEL_HU = -600.0
ATTENTION_CMAP = "inferno"
ATTENTION_ALPHA = 0.45
ATTENTION_FLOOR = 0.2
SEGMENTATION_COLOR = "#00e5ff"
REFERENCE_COLOR = "#7CFC00"
FIGURE_SIZE_IN = (13.0, 5.0)
DPI = 120


def render_overlay(
    ct_path: str | os.PathLike,
    segmentation_path: str | os.PathLike,
    attention_path: str | os.PathLike,
    output_png: str | os.PathLike,
    reference_label_path: str | os.PathLike | None = None,
    title: str | None = None,
) -> Path:
    """Draw axial, coronal and sagittal slices through the lesion into a PNG.

    Each panel shows the CT (HU) with a lung window (W 1500, L -600 HU) and
    the attention map in 'inferno', values below 0.2 transparent. The
    attention is expected in 0-1 and rescaled to 0-1 otherwise. Outlines
    show the segmentation (solid) and, if given, the reference label (dashed). All images must share
    the CT's geometry (size, spacing in mm, origin in mm, direction);
    otherwise ValueError. Slices pass through the segmentation centroid, else
    the reference label centroid, else the attention maximum. The PNG is
    13 x 5 inches at 120 dpi (1560 x 600 pixels), written atomically.
    Returns the path of the PNG.
    """
    ct = sitk.ReadImage(str(ct_path), sitk.sitkFloat32)
    if ct.GetDimension() != 3:
        raise ValueError(f"The CT {ct_path} must be a 3D image, but it has {ct.GetDimension()} dimensions.")

    named = {"segmentation": segmentation_path, "attention": attention_path}
    if reference_label_path is not None:
        named["reference label"] = reference_label_path
    images = {"CT": ct}
    for name, path in named.items():
        image = sitk.ReadImage(str(path))
        _check_same_geometry(ct, image, name, path)
        images[name] = image

    ct_lps = _to_lps_grid(ct, sitk.sitkLinear, float(np.min(sitk.GetArrayViewFromImage(ct))))
    volume = sitk.GetArrayFromImage(ct_lps)
    spacing_zyx = tuple(reversed(ct_lps.GetSpacing()))
    segmentation = _label_array(images["segmentation"])
    attention = _attention_array(images["attention"])
    reference = _label_array(images["reference label"]) if reference_label_path is not None else None

    center = _pick_center(segmentation, reference, attention)
    center_mm = ct_lps.TransformIndexToPhysicalPoint([int(v) for v in reversed(center)])
    rounded_mm = tuple(round(v, 1) for v in center_mm)
    logger.info("Overlay centre at index (z, y, x) %s, LPS %s mm", center, rounded_mm)

    figure = _draw(volume, segmentation, attention, reference, center, spacing_zyx)
    figure.suptitle(title or f"{Path(ct_path).name}: slices through LPS ({center_mm[0]:.1f}, "
                    f"{center_mm[1]:.1f}, {center_mm[2]:.1f}) mm")

    return _save_atomically(figure, Path(output_png))


def _geometry(image: sitk.Image) -> str:
    return (
        f"size={image.GetSize()}, spacing={tuple(round(v, 5) for v in image.GetSpacing())} mm, "
        f"origin={tuple(round(v, 4) for v in image.GetOrigin())} mm, "
        f"direction={tuple(round(v, 5) for v in image.GetDirection())}"
    )


def _check_same_geometry(ct: sitk.Image, other: sitk.Image, name: str, path) -> None:
    """Raise ValueError naming both geometries if ``other`` is not on the CT grid."""
    if other.GetDimension() != 3 or other.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"The {name} {path} must be a 3D scalar image, but it has {other.GetDimension()} "
            f"dimensions and {other.GetNumberOfComponentsPerPixel()} components per voxel."
        )

    same = (
        other.GetSize() == ct.GetSize()
        and np.allclose(other.GetSpacing(), ct.GetSpacing(), rtol=1e-5, atol=1e-4)
        and np.allclose(other.GetOrigin(), ct.GetOrigin(), rtol=1e-6, atol=1e-3)
        and np.allclose(other.GetDirection(), ct.GetDirection(), atol=1e-5)
    )
    if not same:
        raise ValueError(
            f"The {name} {path} does not share the CT's geometry.\n"
            f"  {name}: {_geometry(other)}\n  CT: {_geometry(ct)}\n"
            "Resample it onto the CT grid first (e.g. sitk.Resample(image, ct))."
        )


def _to_lps_grid(image: sitk.Image, interpolator: int, default_value: float) -> sitk.Image:
    """Return ``image`` on a grid whose axes point to L, P and S (identity direction).

    Axis-aligned directions (permutations and flips) are reoriented without
    interpolation. Oblique ones are resampled onto an axis-aligned grid that
    covers the volume, and each output axis takes the spacing (mm) of the
    input axis closest to it.
    """
    direction = np.array(image.GetDirection()).reshape(3, 3)
    if np.allclose(np.abs(direction), np.round(np.abs(direction)), atol=1e-4):
        return sitk.DICOMOrient(image, "LPS")

    size = np.array(image.GetSize())
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
        for corner in np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in size])).reshape(3, -1).T
    ]
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    input_axis = np.argmax(np.abs(direction), axis=1)
    spacing = np.array(image.GetSpacing())[input_axis]
    out_size = np.maximum(np.ceil((high - low) / spacing).astype(int), 1)
    origin = low + spacing / 2.0

    return sitk.Resample(
        image, [int(v) for v in out_size], sitk.Transform(), interpolator,
        origin.tolist(), spacing.tolist(), np.eye(3).ravel().tolist(), default_value,
        image.GetPixelID(),
    )


def _label_array(image: sitk.Image) -> np.ndarray:
    """Return the boolean (z, y, x) mask of voxels > 0 on the LPS grid."""
    labels = sitk.Cast(image > 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(_to_lps_grid(labels, sitk.sitkNearestNeighbor, 0)).astype(bool)


def _attention_array(image: sitk.Image) -> np.ndarray:
    """Return the attention (z, y, x) on the LPS grid, rescaled to 0-1 if outside it."""
    resampled = _to_lps_grid(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkLinear, 0.0)
    attention = sitk.GetArrayFromImage(resampled)
    low, high = float(attention.min()), float(attention.max())
    if low < -1e-6 or high > 1.0 + 1e-6:
        logger.warning("Attention spans %.4g to %.4g, not 0-1, so it is rescaled to 0-1 for display", low, high)
        attention = (attention - low) / (high - low) if high > low else np.zeros_like(attention)
    return attention


def _centroid(mask: np.ndarray) -> tuple[int, int, int]:
    return tuple(int(round(v)) for v in np.argwhere(mask).mean(axis=0))


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Return the largest 26-connected component of a boolean (z, y, x) mask."""
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)), True)
    ordered = sitk.GetArrayFromImage(sitk.RelabelComponent(components))
    return ordered == 1


def _pick_center(segmentation, reference, attention) -> tuple[int, int, int]:
    """Return the (z, y, x) slice centre.

    The order is: the reference label's largest component, the segmentation's largest component, the
    attention maximum. The reference comes first so that the slices pass through the lesion even when
    the segmentation has false positives elsewhere. A largest component, unlike the centroid of all
    voxels, lies on one object.
    """
    if reference is not None and reference.any():
        return _centroid(_largest_component(reference))
    if segmentation.any():
        return _centroid(_largest_component(segmentation))
    logger.info("No label voxels, so slices pass through the attention maximum")
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(attention)), attention.shape))


def _planes(array: np.ndarray, center) -> list[np.ndarray]:
    """Return the axial (y, x), coronal (z, x) and sagittal (z, y) slices through ``center``."""
    z, y, x = center
    return [array[z], array[:, y, :], array[:, :, x]]


def _draw(volume, segmentation, attention, reference, center, spacing_zyx) -> Figure:
    """Build the three-panel figure. Coronal and sagittal rows run inferior to superior."""
    figure = Figure(figsize=FIGURE_SIZE_IN, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    sz, sy, sx = spacing_zyx
    views = [
        ("axial", "upper", sy / sx, ("A", "P", "R", "L")),
        ("coronal", "lower", sz / sx, ("S", "I", "R", "L")),
        ("sagittal", "lower", sz / sy, ("S", "I", "A", "P")),
    ]
    window = (LEVEL_HU - WINDOW_HU / 2.0, LEVEL_HU + WINDOW_HU / 2.0)
    norm = Normalize(0.0, 1.0)
    layers = [
        _planes(array, center) if array is not None else [None] * 3
        for array in (volume, attention, segmentation, reference)
    ]

    for panel, (ax, (name, origin, aspect, letters)) in enumerate(zip(axes, views)):
        ct_slice, heat, seg, ref = (layer[panel] for layer in layers)
        ax.imshow(ct_slice, cmap="gray", vmin=window[0], vmax=window[1], origin=origin,
                  aspect=aspect, interpolation="bilinear")
        ax.imshow(np.ma.masked_less(heat, ATTENTION_FLOOR), cmap=ATTENTION_CMAP, norm=norm,
                  alpha=ATTENTION_ALPHA, origin=origin, aspect=aspect, interpolation="bilinear")
        for mask, color, style in ((seg, SEGMENTATION_COLOR, "solid"), (ref, REFERENCE_COLOR, "dashed")):
            if mask is not None and mask.any():
                ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.3,
                           linestyles=style)

        _orientation_letters(ax, letters)
        ax.set_title(f"{name} (slice {center[panel]})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])

    handles = [Line2D([], [], color=SEGMENTATION_COLOR, lw=1.5, label="segmentation")]
    if reference is not None:
        handles.append(Line2D([], [], color=REFERENCE_COLOR, lw=1.5, ls="--", label="reference label"))
    axes[0].legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.7)
    figure.colorbar(ScalarMappable(norm=norm, cmap=ATTENTION_CMAP), ax=list(axes), shrink=0.85,
                    label="attention (0-1)")
    return figure


def _orientation_letters(ax, letters) -> None:
    """Write top, bottom, left and right patient directions inside the panel."""
    top, bottom, left, right = letters
    style = dict(transform=ax.transAxes, color="yellow", fontsize=9, fontweight="bold",
                 path_effects=[withStroke(linewidth=2.5, foreground="black")])
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)


def _save_atomically(figure: Figure, output: Path) -> Path:
    """Write the PNG to a temp file next to ``output``, then rename it into place."""
    output.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=output.parent, prefix=f".{output.name}.", suffix=".png", delete=False
    )
    temp_path = Path(handle.name)
    try:
        with handle:
            figure.savefig(handle, format="png", dpi=DPI)
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, output)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    logger.info("Wrote overlay %s", output)
    return output
