"""Draw evaluation plots (ROC curves, per-case bars, 2-D embeddings, line series) into PNG files.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no display is needed and the global
backend of the calling process is left alone. Each function writes its PNG atomically (a temporary
file in the target folder, then ``os.replace``), creates missing parent folders and returns the path.
"""

from __future__ import annotations

import logging
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .runs import write_atomically

logger = logging.getLogger(__name__)

DPI = 120
FIGURE_SIZE_IN = (6.4, 4.8)
SQUARE_FIGURE_SIZE_IN = (5.5, 5.5)


def _wrapped(title: str, width: int = 56) -> str:
    """Break a long title into lines of at most ``width`` characters, so that it fits the figure."""
    return "\n".join(textwrap.wrap(title, width)) or title


def plot_roc(curves: Sequence[Mapping], path: str | os.PathLike, title: str) -> Path:
    """Draw one or more ROC curves with the chance diagonal into a PNG.

    Args:
        curves: dicts with ``name``, ``fpr`` and ``tpr`` (equal-length sequences in [0, 1]), ``auc``,
            and optionally ``low`` and ``high`` (confidence bounds). A None or missing bound leaves out the CI.
        path: target PNG file.
        title: figure title.

    Each legend entry reads like "name: AUC 0.83 (95 % CI 0.71-0.92)". The interval is labelled 95 %
    because ``dagman_core.metrics.bootstrap_auc`` defaults to that confidence.
    """
    if not curves:
        raise ValueError("curves is empty. Pass at least one dict with name, fpr, tpr and auc.")

    figure = _new_figure(SQUARE_FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    axes.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="grey", linewidth=1.0, label="chance")

    for curve in curves:
        missing = [key for key in ("name", "fpr", "tpr", "auc") if key not in curve]
        if missing:
            raise ValueError(f"ROC curve {curve.get('name', '?')!r} is missing {missing}. Give name, fpr, tpr and auc.")
        fpr = np.asarray(curve["fpr"], dtype=np.float64)
        tpr = np.asarray(curve["tpr"], dtype=np.float64)
        if fpr.shape != tpr.shape or fpr.ndim != 1:
            raise ValueError(
                f"ROC curve {curve['name']!r}: fpr {fpr.shape} and tpr {tpr.shape} must be 1-D of one length"
            )
        axes.plot(fpr, tpr, linewidth=1.8, label=_roc_legend(curve))

    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.0)
    axes.set_aspect("equal")
    axes.set_xlabel("False positive rate (1 - specificity)")
    axes.set_ylabel("True positive rate (sensitivity)")
    axes.set_title(_wrapped(title), fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    return _save_atomically(figure, Path(path))


def plot_per_case(
    names: Sequence[str],
    values: Sequence[float],
    path: str | os.PathLike,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """Draw one bar per case in the given order (for example Dice per case) with the mean as a line.

    Args:
        names: case names, shape (N,), used as x tick labels.
        values: one value per case, shape (N,). A NaN value gets no bar and stays out of the mean.
        path: target PNG file.
        ylabel: y-axis label, with its unit if any.
        title: figure title.
        ylim: fixed y-axis range, such as (0, 1) for Dice; None scales it to the values.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {values.shape}")
    if len(names) != values.size:
        raise ValueError(f"names ({len(names)}) and values ({values.size}) must have one entry per case")

    width_in = max(FIGURE_SIZE_IN[0], 0.3 * values.size + 1.5)
    figure = _new_figure((width_in, FIGURE_SIZE_IN[1]))
    axes = figure.add_subplot()
    positions = np.arange(values.size)
    axes.bar(positions, np.nan_to_num(values, nan=0.0), color="#4c72b0")

    finite = values[np.isfinite(values)]
    if finite.size:
        mean = float(finite.mean())
        axes.axhline(mean, color="#c44e52", linestyle="--", linewidth=1.5, label=f"mean {mean:.3g}")
        axes.legend(loc="best", fontsize=8)

    axes.set_xticks(positions)
    axes.set_xticklabels([str(name) for name in names], rotation=60, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    if ylim is not None:
        axes.set_ylim(*ylim)
    axes.set_title(_wrapped(title), fontsize=11)
    axes.grid(axis="y", alpha=0.3)
    return _save_atomically(figure, Path(path))


def plot_embedding(
    points: np.ndarray,
    labels: Sequence,
    class_names: Sequence[str] | Mapping,
    path: str | os.PathLike,
    title: str,
) -> Path:
    """Draw a 2-D embedding (for example UMAP or t-SNE output) as a scatter coloured by class.

    Args:
        points: shape (N, 2), coordinates in embedding units.
        labels: shape (N,), class of each point: an index into ``class_names`` when it is a sequence,
            or a key of ``class_names`` when it is a mapping.
        class_names: legend name of each class.
        path: target PNG file.
        title: figure title.
    """
    points = np.asarray(points, dtype=np.float64)
    labels = np.asarray(labels)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2), got {points.shape}. Reduce the features to 2-D first.")
    if labels.shape != (points.shape[0],):
        raise ValueError(f"labels must have shape ({points.shape[0]},) to match points, got {labels.shape}")

    figure = _new_figure(SQUARE_FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    for class_value in np.unique(labels):
        selected = points[labels == class_value]
        axes.scatter(selected[:, 0], selected[:, 1], s=18, alpha=0.8, label=_class_name(class_names, class_value.item()))

    axes.set_xlabel("component 1")
    axes.set_ylabel("component 2")
    axes.set_title(_wrapped(title), fontsize=11)
    axes.legend(loc="best", fontsize=8, markerscale=1.5)
    return _save_atomically(figure, Path(path))


def plot_lines(
    x: Sequence[float],
    series: Mapping[str, Sequence[float]],
    path: str | os.PathLike,
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """Draw several named series against one x axis (for example per-stage head statistics).

    Args:
        x: shape (K,), shared x values.
        series: name to values, each of shape (K,).
        path: target PNG file.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
    """
    x = np.asarray(x, dtype=np.float64)
    if not series:
        raise ValueError("series is empty. Pass at least one name -> values entry.")

    figure = _new_figure(FIGURE_SIZE_IN)
    axes = figure.add_subplot()
    for name, values in series.items():
        values = np.asarray(values, dtype=np.float64)
        if values.shape != x.shape:
            raise ValueError(f"series {name!r} has shape {values.shape}, but x has shape {x.shape}. Give one value per x.")
        axes.plot(x, values, marker="o", markersize=3, linewidth=1.5, label=str(name))

    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(_wrapped(title), fontsize=11)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize=8)
    return _save_atomically(figure, Path(path))


def _roc_legend(curve: Mapping) -> str:
    """Format a legend entry such as "name: AUC 0.83 (95 % CI 0.71-0.92)"."""
    text = f"{curve['name']}: AUC {float(curve['auc']):.2f}"
    low = curve.get("low")
    high = curve.get("high")
    if low is not None and high is not None and math.isfinite(low) and math.isfinite(high):
        text += f" (95 % CI {float(low):.2f}-{float(high):.2f})"
    return text


def _class_name(class_names: Sequence[str] | Mapping, class_value) -> str:
    """Look up the legend name of one class, falling back to the class value itself."""
    if isinstance(class_names, Mapping):
        return str(class_names.get(class_value, class_value))
    if isinstance(class_value, (int, np.integer)) and 0 <= class_value < len(class_names):
        return str(class_names[class_value])
    return str(class_value)


def _new_figure(size_in: tuple[float, float]) -> Figure:
    """Create a figure on an Agg canvas (no pyplot, no display)."""
    figure = Figure(figsize=size_in, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save_atomically(figure: Figure, output: Path) -> Path:
    """Write the PNG to a temporary file next to ``output``, then rename it into place."""
    write_atomically(output, lambda stream: figure.savefig(stream, format="png", dpi=DPI))
    logger.info("Wrote plot %s", output)
    return output
