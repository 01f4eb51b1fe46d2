"""Compute evaluation metrics: overlap and surface distance of masks, lesion detection, ROC/AUC and cluster distances.

Only numpy and scipy are used, so the Slicer module can import this file without scikit-learn or MONAI.
Masks are arrays of shape (X, Y, Z) whose nonzero voxels are foreground, and spacings are in mm per axis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist
from scipy.stats import rankdata

# Rows of one class compared per cdist call in cluster_distances. Each call then returns at most
# _DISTANCE_CHUNK x N float64 distances, which is 16 MB for N = 1000 points.
_DISTANCE_CHUNK = 2048

# bootstrap_auc gives up after this many draws per requested resample that miss a class.
_MAX_DRAWS_PER_SAMPLE = 100


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Return the Dice similarity coefficient of two binary masks of one shape (1.0 when both are empty)."""
    prediction = np.asarray(prediction).astype(bool)
    reference = np.asarray(reference).astype(bool)
    if prediction.shape != reference.shape:
        raise ValueError(f"mask shapes differ: prediction {prediction.shape}, reference {reference.shape}")
    total = prediction.sum() + reference.sum()
    if total == 0:
        return 1.0
    return float(2.0 * np.logical_and(prediction, reference).sum() / total)


# ---------------------------------------------------------------------------
# Surface distance


def hausdorff95(prediction: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Compute the symmetric 95th-percentile Hausdorff distance (HD95) in mm between two binary masks.

    Args:
        prediction: mask of shape (X, Y, Z) whose nonzero voxels are foreground.
        reference: mask of the same shape.
        spacing_mm: voxel spacing in mm, one positive value per axis.

    The convention follows ``monai.metrics.compute_hausdorff_distance(..., percentile=95, spacing=...)``
    of MONAI 1.6.1. The surface of a mask is the set of its voxels that have at least one face neighbour
    (6-connectivity in 3-D) outside the mask, which is the mask XOR its binary erosion. Voxels beyond
    the array edge count as background, so foreground on the edge is surface. Distances run between
    voxel centres, scaled by ``spacing_mm``. For each surface voxel of one mask the distance to the
    nearest surface voxel of the other is taken. HD95 is the larger of the two directed 95th
    percentiles (linear interpolation), not one percentile of both directions pooled.

    Edge cases: both masks empty gives 0.0. Exactly one empty gives ``float("inf")``, which the
    caller reports as a missed or spurious segmentation. MONAI returns NaN in both cases.
    """
    prediction, reference = _mask_pair(prediction, reference)
    spacing = _spacing_array(spacing_mm, prediction.ndim)

    has_prediction = bool(prediction.any())
    has_reference = bool(reference.any())
    if not has_prediction and not has_reference:
        return 0.0
    if not has_prediction or not has_reference:
        return float("inf")

    prediction_surface = _surface_points_mm(prediction, spacing)
    reference_surface = _surface_points_mm(reference, spacing)
    prediction_to_reference = cKDTree(reference_surface).query(prediction_surface, k=1)[0]
    reference_to_prediction = cKDTree(prediction_surface).query(reference_surface, k=1)[0]

    return float(max(np.percentile(prediction_to_reference, 95), np.percentile(reference_to_prediction, 95)))


def _surface_points_mm(mask: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Return the centres (K, ndim) in mm of the surface voxels of a non-empty mask."""
    bounds = ndimage.find_objects(mask.astype(np.uint8))[0]
    offset = np.array([axis_slice.start for axis_slice in bounds])

    # A one-voxel zero border makes the erosion treat the array edge as background.
    cropped = np.pad(mask[bounds], 1, constant_values=False)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    surface = cropped & ~ndimage.binary_erosion(cropped, structure=structure)

    indices = np.argwhere(surface) - 1 + offset
    return indices * spacing


# ---------------------------------------------------------------------------
# Lesion-wise detection


def lesion_metrics(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing_mm: Sequence[float],
    large_volume_cc: float = 3.0,
) -> dict:
    """Match predicted to reference lesions by overlap and score each lesion and each size group.

    Args:
        prediction: mask of shape (X, Y, Z) whose nonzero voxels are foreground.
        reference: mask of the same shape.
        spacing_mm: voxel spacing in mm, one positive value per axis.
        large_volume_cc: a lesion of at most this volume (cc, that is mL) is "small", a larger one "large".

    Lesions are the connected components of ``reference`` and predicted components those of
    ``prediction``, both with 26-connectivity (face, edge and corner neighbours in 3-D). A predicted
    component touches a lesion when they share at least one voxel.

    Returns:
        A dict with

        - ``lesions``: one dict per lesion, in ``scipy.ndimage.label`` order (first voxel in C order).
          Each has ``index`` (1-based), ``voxels``, ``volume_cc`` and ``size`` ("small" or "large").
          ``detected`` is True when at least one predicted voxel lies inside the lesion. ``dice`` is
          the Dice between the lesion and the union of the predicted components that touch it
          (0.0 when undetected).
        - ``predicted_components``: number of predicted components.
        - ``false_positive_components``: number of predicted components that touch no lesion.
        - ``summary``: for "small", "large" and "all", a dict with ``count``, ``detected`` (count)
          and ``mean_dice`` (NaN when the group has no lesion).
        - ``large_volume_cc``: the threshold used.

    A predicted component that touches two lesions counts in the Dice of both.
    """
    prediction, reference = _mask_pair(prediction, reference)
    spacing = _spacing_array(spacing_mm, prediction.ndim)
    if not math.isfinite(large_volume_cc) or large_volume_cc < 0:
        raise ValueError(f"large_volume_cc must be a finite volume >= 0 in cc, got {large_volume_cc}")

    structure = np.ones((3,) * prediction.ndim, dtype=bool)
    lesion_labels, lesion_count = ndimage.label(reference, structure=structure)
    component_labels, component_count = ndimage.label(prediction, structure=structure)

    lesion_voxels = np.bincount(lesion_labels.ravel(), minlength=lesion_count + 1)
    component_voxels = np.bincount(component_labels.ravel(), minlength=component_count + 1)
    detected_voxels = np.bincount(lesion_labels[prediction], minlength=lesion_count + 1)

    # Every (lesion, predicted component) pair that shares a voxel, one column per pair.
    shared = (lesion_labels > 0) & (component_labels > 0)
    touching_pairs = np.unique(np.stack([lesion_labels[shared], component_labels[shared]]), axis=1)

    voxel_cc = float(np.prod(spacing)) / 1000.0
    lesions = []
    for index in range(1, lesion_count + 1):
        touching = touching_pairs[1][touching_pairs[0] == index]
        # Every predicted voxel inside the lesion lies in a touching component, so the
        # intersection with their union is the lesion's predicted voxel count.
        union_voxels = int(component_voxels[touching].sum())
        overlap = int(detected_voxels[index])
        volume_cc = int(lesion_voxels[index]) * voxel_cc
        lesions.append({
            "index": index,
            "voxels": int(lesion_voxels[index]),
            "volume_cc": volume_cc,
            "size": "small" if volume_cc <= large_volume_cc else "large",
            "detected": overlap > 0,
            "dice": 2.0 * overlap / (int(lesion_voxels[index]) + union_voxels),
        })

    matched_components = np.unique(touching_pairs[1]).size
    summary = {
        group: _lesion_group_summary([lesion for lesion in lesions if group in ("all", lesion["size"])])
        for group in ("small", "large", "all")
    }
    return {
        "lesions": lesions,
        "predicted_components": int(component_count),
        "false_positive_components": int(component_count - matched_components),
        "summary": summary,
        "large_volume_cc": float(large_volume_cc),
    }


def _lesion_group_summary(lesions: list[dict]) -> dict:
    """Count lesions and detections in one group and average their Dice (NaN for an empty group)."""
    return {
        "count": len(lesions),
        "detected": sum(1 for lesion in lesions if lesion["detected"]),
        "mean_dice": float(np.mean([lesion["dice"] for lesion in lesions])) if lesions else float("nan"),
    }


# ---------------------------------------------------------------------------
# ROC analysis


def roc_curve(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the ROC curve of binary labels against scores, a case being positive when score >= threshold.

    Args:
        labels: shape (N,), values 0 and 1 (or bool), both present.
        scores: shape (N,), finite, higher for more likely positive cases.

    Returns:
        ``(fpr, tpr, thresholds)``, each of shape (K + 1,) for K distinct scores. Thresholds are the
        distinct scores in decreasing order after a leading ``inf`` for the point (0, 0). Every distinct
        score gives a point, as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)`` does.
    """
    false_positives, true_positives, thresholds = _roc_counts(labels, scores)

    tpr = true_positives / true_positives[-1]
    fpr = false_positives / false_positives[-1]
    return fpr, tpr, thresholds


def _roc_counts(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return false and true positive counts (int64) and thresholds of every ROC point, from (0, 0) on."""
    labels, scores = _binary_inputs(labels, scores)

    order = np.argsort(-scores, kind="mergesort")
    sorted_scores = scores[order]
    sorted_labels = labels[order]

    # Last position of each run of equal scores: all tied cases cross the threshold together.
    run_ends = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(sorted_labels)[run_ends]
    false_positives = run_ends + 1 - true_positives

    zero = np.zeros(1, dtype=np.int64)
    thresholds = np.r_[np.inf, sorted_scores[run_ends]]
    return np.r_[zero, false_positives], np.r_[zero, true_positives], thresholds


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Compute the area under the ROC curve (AUC) of binary labels against scores.

    The AUC equals the Mann-Whitney U statistic over (positives x negatives): the fraction of
    positive-negative pairs where the positive scores higher, a tie counting one half. This is
    the trapezoidal area under ``roc_curve`` and matches ``sklearn.metrics.roc_auc_score``.
    Shapes and values as in ``roc_curve``.
    """
    labels, scores = _binary_inputs(labels, scores)

    ranks = rankdata(scores)
    positives = int(labels.sum())
    negatives = labels.size - positives
    rank_sum = float(ranks[labels == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def multiclass_auc(labels: Sequence[int], probabilities: np.ndarray) -> float:
    """Compute the macro one-vs-rest AUC of class indices against class probabilities.

    Args:
        labels: shape (N,), integer class indices in 0..C-1 with at least two classes present.
        probabilities: shape (N, C), finite scores per class (rows need not sum to 1).

    Each class present in ``labels`` contributes ``roc_auc(labels == c, probabilities[:, c])`` and the
    result is their unweighted mean. Classes absent from ``labels`` are skipped. With all C classes
    present this matches ``sklearn.metrics.roc_auc_score(..., multi_class="ovr", average="macro")``.
    """
    labels, probabilities = _multiclass_inputs(labels, probabilities)

    present = np.unique(labels)
    areas = [roc_auc((labels == class_index).astype(np.int64), probabilities[:, class_index]) for class_index in present]
    return float(np.mean(areas))


def bootstrap_auc(
    labels: Sequence[int],
    scores_or_probabilities: np.ndarray,
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Estimate the AUC and its percentile bootstrap confidence interval over cases.

    Args:
        labels: shape (N,), 0/1 for binary scores or class indices for probabilities.
        scores_or_probabilities: shape (N,) scores for a binary AUC (``roc_auc``) or shape (N, C)
            probabilities for a macro one-vs-rest AUC (``multiclass_auc``).
        samples: number of bootstrap resamples kept.
        confidence: two-sided coverage of the interval, in (0, 1).
        seed: seed of the ``numpy.random.Generator`` that draws the resamples.

    Each resample draws N cases with replacement. A resample that misses a class present in the
    full data is redrawn (not skipped), so every kept estimate averages over the same classes and
    exactly ``samples`` estimates are kept. After ``samples * 100`` draws without enough valid
    resamples a ValueError is raised.

    Returns:
        ``(auc, low, high)``: the AUC of all cases and the (1 - confidence) / 2 and
        (1 + confidence) / 2 percentiles of the resampled AUCs.
    """
    values = np.asarray(scores_or_probabilities, dtype=np.float64)
    if values.ndim == 1:
        statistic = roc_auc
        labels_array, values = _binary_inputs(labels, values)
    elif values.ndim == 2:
        statistic = multiclass_auc
        labels_array, values = _multiclass_inputs(labels, values)
    else:
        raise ValueError(
            f"scores_or_probabilities must have shape (N,) or (N, C), got {values.shape}. "
            "Pass 1-D scores for a binary AUC or per-class probabilities for a multi-class AUC."
        )
    if not isinstance(samples, (int, np.integer)) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), for example 0.95, got {confidence}")

    auc = statistic(labels_array, values)

    class_count = np.unique(labels_array).size
    case_count = labels_array.size
    generator = np.random.default_rng(seed)
    estimates = np.empty(samples)
    kept = 0
    draws = 0
    max_draws = samples * _MAX_DRAWS_PER_SAMPLE
    while kept < samples:
        if draws >= max_draws:
            raise ValueError(
                f"only {kept} of {samples} bootstrap resamples contained every class after {draws} draws. "
                "The rarest class has too few cases for a bootstrap interval, so add cases of that class."
            )
        draws += 1
        indices = generator.integers(0, case_count, size=case_count)
        if np.unique(labels_array[indices]).size < class_count:
            continue
        estimates[kept] = statistic(labels_array[indices], values[indices])
        kept += 1

    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(estimates, [tail, 100.0 - tail])
    return float(auc), float(low), float(high)


def youden_point(labels: Sequence[int], scores: Sequence[float]) -> dict:
    """Find the ROC operating point that maximises Youden's J = sensitivity + specificity - 1.

    A case counts as positive when its score is >= ``threshold``. Only finite thresholds (observed
    scores) are candidates. When several points share the maximum J the highest threshold wins.
    Shapes and values as in ``roc_curve``.

    Returns:
        A dict with ``threshold``, ``sensitivity``, ``specificity`` and ``youden_j``.
    """
    false_positives, true_positives, thresholds = _roc_counts(labels, scores)
    positives = int(true_positives[-1])
    negatives = int(false_positives[-1])

    # J * positives * negatives in integers, so equal J values compare equal without rounding error.
    scaled_j = true_positives[1:] * negatives - false_positives[1:] * positives
    best = int(np.argmax(scaled_j)) + 1

    sensitivity = true_positives[best] / positives
    specificity = 1.0 - false_positives[best] / negatives
    return {
        "threshold": float(thresholds[best]),
        "sensitivity": float(sensitivity),
        "specificity": float(specificity),
        "youden_j": float(sensitivity + specificity - 1.0),
    }


# ---------------------------------------------------------------------------
# Embedding cluster distances


def cluster_distances(features: np.ndarray, labels: Sequence) -> dict:
    """Measure how tightly each class clusters: Euclidean distances within and between classes.

    Args:
        features: shape (N, D), finite feature vectors (for example embeddings).
        labels: shape (N,), class value per point, with at least two classes.

    Returns:
        A dict with

        - ``per_class``: a dict per class value (as a Python scalar) with ``count`` and four statistics.
          ``intra_mean`` and ``intra_std`` cover the distances between all pairs of points of that
          class, each unordered pair once. ``inter_mean`` and ``inter_std`` cover the distances from
          its points to every point of the other classes. Standard deviations are population
          values (ddof = 0).
        - ``intra``: mean over all same-class pairs of all classes pooled.
        - ``inter``: mean over all pairs of points from different classes.

    A class with a single point has no pairs, so its ``intra_mean`` and ``intra_std`` are NaN and it
    adds nothing to ``intra``. ``intra`` is NaN when every class has a single point.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"features must have shape (N, D), got {features.shape}. Reshape to one row per point.")
    if labels.shape != (features.shape[0],):
        raise ValueError(f"labels must have shape ({features.shape[0]},) to match features, got {labels.shape}")
    if not np.isfinite(features).all():
        raise ValueError("features contain NaN or infinite values. Drop or fix those points.")
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"cluster distances need at least two classes, got only {classes.tolist()}")

    per_class = {}
    intra_total = (0, 0.0, 0.0)
    inter_total = (0, 0.0, 0.0)
    for class_value in classes:
        members = features[labels == class_value]
        others = features[labels != class_value]
        intra = _within_class_stats(members)
        inter = _between_class_stats(members, others)
        intra_total = _merge_stats(intra_total, intra)
        inter_total = _merge_stats(inter_total, inter)
        per_class[class_value.item()] = {
            "count": int(members.shape[0]),
            "intra_mean": _stats_mean(intra),
            "intra_std": _stats_std(intra),
            "inter_mean": _stats_mean(inter),
            "inter_std": _stats_std(inter),
        }

    # Each between-class pair enters two classes' stats, which leaves the pooled mean unchanged.
    return {"per_class": per_class, "intra": _stats_mean(intra_total), "inter": _stats_mean(inter_total)}


def _within_class_stats(points: np.ndarray) -> tuple[int, float, float]:
    """Return (count, mean, sum of squared deviations) of the distances of all unordered point pairs."""
    stats = (0, 0.0, 0.0)
    for start in range(0, points.shape[0], _DISTANCE_CHUNK):
        stop = min(start + _DISTANCE_CHUNK, points.shape[0])
        block = cdist(points[start:stop], points[start:])
        later = np.triu(np.ones(block.shape, dtype=bool), k=1)
        stats = _merge_stats(stats, _batch_stats(block[later]))
    return stats


def _between_class_stats(points: np.ndarray, others: np.ndarray) -> tuple[int, float, float]:
    """Return (count, mean, sum of squared deviations) of the distances from ``points`` to ``others``."""
    stats = (0, 0.0, 0.0)
    for start in range(0, points.shape[0], _DISTANCE_CHUNK):
        block = cdist(points[start:start + _DISTANCE_CHUNK], others)
        stats = _merge_stats(stats, _batch_stats(block.ravel()))
    return stats


def _batch_stats(values: np.ndarray) -> tuple[int, float, float]:
    """Return (count, mean, sum of squared deviations) of ``values``."""
    if values.size == 0:
        return (0, 0.0, 0.0)
    mean = float(values.mean())
    return (int(values.size), mean, float(((values - mean) ** 2).sum()))


def _merge_stats(first: tuple[int, float, float], second: tuple[int, float, float]) -> tuple[int, float, float]:
    """Combine two (count, mean, sum of squared deviations) summaries (Chan et al.'s parallel update)."""
    count_a, mean_a, squares_a = first
    count_b, mean_b, squares_b = second
    count = count_a + count_b
    if count == 0:
        return (0, 0.0, 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * count_b / count
    squares = squares_a + squares_b + delta * delta * count_a * count_b / count
    return (count, mean, squares)


def _stats_mean(stats: tuple[int, float, float]) -> float:
    """Return the mean of a summary, NaN when it contains no values."""
    return stats[1] if stats[0] > 0 else float("nan")


def _stats_std(stats: tuple[int, float, float]) -> float:
    """Return the population standard deviation of a summary, NaN when it contains no values."""
    return math.sqrt(stats[2] / stats[0]) if stats[0] > 0 else float("nan")


# ---------------------------------------------------------------------------
# Input checks


def _mask_pair(prediction: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return both masks as bool arrays after checking that they share one shape with at least one axis."""
    prediction = np.asarray(prediction).astype(bool)
    reference = np.asarray(reference).astype(bool)
    if prediction.shape != reference.shape:
        raise ValueError(
            f"mask shapes differ: prediction {prediction.shape}, reference {reference.shape}. "
            "Resample both onto the same voxel grid first."
        )
    if prediction.ndim == 0:
        raise ValueError("masks must be arrays of shape (X, Y, Z), got scalars")
    return prediction, reference


def _spacing_array(spacing_mm: Sequence[float], ndim: int) -> np.ndarray:
    """Return ``spacing_mm`` as a float array after checking one finite positive value per axis."""
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(-1)
    if spacing.size != ndim:
        raise ValueError(f"spacing_mm must give one value per mask axis ({ndim}), got {list(spacing_mm)}")
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        raise ValueError(f"spacing_mm must be finite and positive (mm), got {spacing.tolist()}")
    return spacing


def _binary_inputs(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as int64 0/1 and scores as float64 after checking shapes, values and both classes."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {labels.shape}")
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores must have the shape of labels {labels.shape}, got {scores.shape}. "
            "For per-class probabilities use multiclass_auc."
        )
    values = np.unique(labels)
    if not np.isin(values, [0, 1]).all():
        raise ValueError(f"binary labels must be 0 or 1, got values {values.tolist()}. Map the positive class to 1.")
    if values.size < 2:
        raise ValueError(
            f"ROC analysis needs both classes, but every label is {values.tolist()}. Add cases of the other class."
        )
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values. Drop those cases or fix the scores.")
    return labels.astype(np.int64), scores


def _multiclass_inputs(labels: Sequence[int], probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return labels as int64 class indices and probabilities as float64 after checking shapes and values."""
    labels = np.asarray(labels)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(f"probabilities must have shape (N, C) with C >= 2, got {probabilities.shape}")
    if labels.shape != (probabilities.shape[0],):
        raise ValueError(f"labels must have shape ({probabilities.shape[0]},) to match probabilities, got {labels.shape}")
    if labels.size == 0:
        raise ValueError("labels and probabilities are empty, but AUC needs cases of at least two classes")
    class_count = probabilities.shape[1]
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.array_equal(labels, np.round(labels))
    )
    if not integral or labels.min() < 0 or labels.max() >= class_count:
        raise ValueError(
            f"labels must be class indices 0..{class_count - 1} (one per probability column), "
            f"got values {np.unique(labels).tolist()}"
        )
    if np.unique(labels).size < 2:
        raise ValueError(
            f"AUC needs at least two classes, but every label is {labels[0]}. Add cases of another class."
        )
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities contain NaN or infinite values. Drop those cases or fix the scores.")
    return labels.astype(np.int64), probabilities
