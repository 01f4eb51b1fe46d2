"""Check the evaluation metrics against hand-worked values, scikit-learn and MONAI, and the plots as PNGs."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy.spatial.distance import cdist, pdist
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve

from dagman_core import metrics
from dagman_core.metrics import (
    bootstrap_auc,
    cluster_distances,
    dice,
    hausdorff95,
    lesion_metrics,
    multiclass_auc,
    roc_auc,
    roc_curve,
    youden_point,
)
from dagman_train import plots

ANISOTROPIC_SPACING = (0.7, 1.3, 2.5)

# MONAI 1.6 warns about its own deprecated get_mask_edges argument on every HD call.
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")


def random_mask_pair(seed: int, shape=(12, 10, 8)) -> tuple[np.ndarray, np.ndarray]:
    """Return a box-shaped reference and a noisy prediction that overlaps it (some voxels on the array edge)."""
    rng = np.random.default_rng(seed)
    reference = np.zeros(shape, dtype=bool)
    starts = [int(rng.integers(0, 4)) for _ in shape]
    stops = [int(rng.integers(start + 2, size + 1)) for start, size in zip(starts, shape)]
    reference[tuple(slice(start, stop) for start, stop in zip(starts, stops))] = True
    prediction = (rng.random(shape) < 0.15) | (reference & (rng.random(shape) < 0.8))
    return prediction, reference


def as_batch(mask: np.ndarray) -> torch.Tensor:
    """Add MONAI's batch and channel axes: (X, Y, Z) -> (1, 1, X, Y, Z)."""
    return torch.from_numpy(mask)[None, None]


# ---------------------------------------------------------------------------
# Dice and HD95


def test_dice_matches_monai():
    for seed in range(5):
        prediction, reference = random_mask_pair(seed)
        expected = compute_dice(as_batch(prediction).float(), as_batch(reference).float(), include_background=True).item()
        assert dice(prediction, reference) == pytest.approx(expected, abs=1e-6), f"seed {seed}"


def test_hd95_matches_monai_anisotropic():
    for seed in range(8):
        prediction, reference = random_mask_pair(seed)
        expected = compute_hausdorff_distance(
            as_batch(prediction), as_batch(reference), percentile=95, spacing=ANISOTROPIC_SPACING
        ).item()
        assert hausdorff95(prediction, reference, ANISOTROPIC_SPACING) == pytest.approx(expected, abs=1e-4), f"seed {seed}"


def test_hd95_matches_monai_edge_mask():
    prediction = np.zeros((6, 7, 5), dtype=bool)
    reference = np.zeros((6, 7, 5), dtype=bool)
    prediction[:4, :, 1:4] = True
    reference[1:, 2:6, :] = True
    expected = compute_hausdorff_distance(
        as_batch(prediction), as_batch(reference), percentile=95, spacing=ANISOTROPIC_SPACING
    ).item()

    assert hausdorff95(prediction, reference, ANISOTROPIC_SPACING) == pytest.approx(expected, abs=1e-4)


def test_hd95_shifted_cubes_by_hand():
    # A 5-voxel cube and the same cube shifted 2 voxels along x. Of the 98 surface voxels of
    # one cube, 48 lie on the other's surface (0), 24 are 1 voxel from it and 26 are 2 voxels
    # away, so the 95th percentile (position 92.15 of 0..97) is 2 voxels = 3.0 mm in both directions.
    reference = np.zeros((12, 10, 10), dtype=bool)
    prediction = np.zeros((12, 10, 10), dtype=bool)
    reference[2:7, 2:7, 2:7] = True
    prediction[4:9, 2:7, 2:7] = True

    assert hausdorff95(prediction, reference, (1.5, 1.5, 1.5)) == pytest.approx(3.0)


def test_hd95_single_voxels_by_hand():
    prediction = np.zeros((5, 6, 3), dtype=bool)
    reference = np.zeros((5, 6, 3), dtype=bool)
    prediction[0, 0, 1] = True
    reference[3, 4, 1] = True

    assert hausdorff95(prediction, reference, (1.0, 1.0, 1.0)) == pytest.approx(5.0)
    assert hausdorff95(prediction, reference, (2.0, 1.0, 7.0)) == pytest.approx(math.sqrt(6.0**2 + 4.0**2))


def test_hd95_identical_masks_zero():
    _, reference = random_mask_pair(3)

    assert hausdorff95(reference, reference, ANISOTROPIC_SPACING) == 0.0


def test_hd95_empty_mask_conventions():
    empty = np.zeros((4, 4, 4), dtype=bool)
    full = np.zeros((4, 4, 4), dtype=bool)
    full[1:3, 1:3, 1:3] = True

    assert hausdorff95(empty, empty, (1.0, 1.0, 1.0)) == 0.0
    assert hausdorff95(empty, full, (1.0, 1.0, 1.0)) == float("inf")
    assert hausdorff95(full, empty, (1.0, 1.0, 1.0)) == float("inf")


def test_hd95_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="mask shapes differ"):
        hausdorff95(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1.0, 1.0, 1.0))


def test_hd95_rejects_bad_spacing():
    mask = np.ones((3, 3, 3), dtype=bool)

    with pytest.raises(ValueError, match="one value per mask axis"):
        hausdorff95(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="finite and positive"):
        hausdorff95(mask, mask, (1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------
# Lesion metrics

# At 2 mm isotropic spacing one voxel is 8 mm^3 = 0.008 cc.
LESION_SPACING = (2.0, 2.0, 2.0)


def two_lesion_case() -> tuple[np.ndarray, np.ndarray]:
    """Return a prediction and a reference with one large and one small lesion and a false-positive blob.

    The large lesion is an 8^3 cube (512 voxels, 4.096 cc) whose right half (4 x 8 x 8 = 256 voxels) is
    covered by a 6 x 8 x 8 predicted block (384 voxels), so its Dice is 2 * 256 / (512 + 384) = 4/7.
    The small lesion is a 3^3 cube (27 voxels, 0.216 cc) that no predicted voxel touches.
    A 2^3 predicted blob far from both lesions is the one false-positive component.
    """
    reference = np.zeros((30, 20, 20), dtype=bool)
    prediction = np.zeros((30, 20, 20), dtype=bool)
    reference[2:10, 2:10, 2:10] = True
    reference[20:23, 14:17, 14:17] = True
    prediction[6:12, 2:10, 2:10] = True
    prediction[25:27, 2:4, 2:4] = True
    return prediction, reference


def test_lesions_volumes_and_sizes():
    prediction, reference = two_lesion_case()

    result = lesion_metrics(prediction, reference, LESION_SPACING)
    large, small = result["lesions"]

    assert len(result["lesions"]) == 2
    assert large["voxels"] == 512
    assert large["volume_cc"] == pytest.approx(4.096)
    assert large["size"] == "large"
    assert small["voxels"] == 27
    assert small["volume_cc"] == pytest.approx(0.216)
    assert small["size"] == "small"


def test_lesions_detection_and_dice():
    prediction, reference = two_lesion_case()

    large, small = lesion_metrics(prediction, reference, LESION_SPACING)["lesions"]

    assert large["detected"] is True
    assert large["dice"] == pytest.approx(4.0 / 7.0)
    assert small["detected"] is False
    assert small["dice"] == 0.0


def test_lesions_false_positive_count():
    prediction, reference = two_lesion_case()

    result = lesion_metrics(prediction, reference, LESION_SPACING)

    assert result["predicted_components"] == 2
    assert result["false_positive_components"] == 1


def test_lesions_group_summary():
    prediction, reference = two_lesion_case()

    summary = lesion_metrics(prediction, reference, LESION_SPACING)["summary"]

    assert summary["large"] == {"count": 1, "detected": 1, "mean_dice": pytest.approx(4.0 / 7.0)}
    assert summary["small"] == {"count": 1, "detected": 0, "mean_dice": 0.0}
    assert summary["all"] == {"count": 2, "detected": 1, "mean_dice": pytest.approx(2.0 / 7.0)}


def test_lesions_single_voxel_detection():
    # One predicted voxel inside a 27-voxel lesion: Dice = 2 * 1 / (27 + 1) = 1/14.
    reference = np.zeros((8, 8, 8), dtype=bool)
    prediction = np.zeros((8, 8, 8), dtype=bool)
    reference[2:5, 2:5, 2:5] = True
    prediction[3, 3, 3] = True

    (lesion,) = lesion_metrics(prediction, reference, (1.0, 1.0, 1.0))["lesions"]

    assert lesion["detected"] is True
    assert lesion["dice"] == pytest.approx(1.0 / 14.0)


def test_lesions_shared_component_counts_twice():
    # Two 2 x 2 x 2 lesions bridged by one predicted bar of 2 x 2 x 6 voxels: each lesion's Dice
    # is 2 * 8 / (8 + 24) = 0.5, and the bar is not a false positive.
    reference = np.zeros((4, 4, 10), dtype=bool)
    prediction = np.zeros((4, 4, 10), dtype=bool)
    reference[0:2, 0:2, 0:2] = True
    reference[0:2, 0:2, 4:6] = True
    prediction[0:2, 0:2, 0:6] = True

    result = lesion_metrics(prediction, reference, (1.0, 1.0, 1.0))

    assert [lesion["dice"] for lesion in result["lesions"]] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert result["false_positive_components"] == 0


def test_lesions_corner_contact_joins():
    reference = np.zeros((4, 4, 4), dtype=bool)
    reference[0, 0, 0] = True
    reference[1, 1, 1] = True

    result = lesion_metrics(np.zeros_like(reference), reference, (1.0, 1.0, 1.0))

    assert len(result["lesions"]) == 1
    assert result["lesions"][0]["voxels"] == 2


def test_lesions_threshold_volume_is_small():
    # 27 voxels of 1 mm^3 = 0.027 cc, exactly at the threshold.
    reference = np.zeros((5, 5, 5), dtype=bool)
    reference[1:4, 1:4, 1:4] = True

    (lesion,) = lesion_metrics(reference, reference, (1.0, 1.0, 1.0), large_volume_cc=0.027)["lesions"]

    assert lesion["size"] == "small"
    assert lesion["dice"] == pytest.approx(1.0)


def test_lesions_empty_group_mean_nan():
    empty = np.zeros((4, 4, 4), dtype=bool)

    summary = lesion_metrics(empty, empty, (1.0, 1.0, 1.0))["summary"]

    assert summary["all"]["count"] == 0
    assert math.isnan(summary["all"]["mean_dice"])


# ---------------------------------------------------------------------------
# ROC curve and AUC


def test_auc_hand_example():
    # Positive-negative pairs: (0.35, 0.1) and (0.8, both) are correct, (0.35, 0.4) is not: 3 of 4.
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_auc_ties_count_half():
    # Pairs: (0.6 vs 0.2) 1, (0.6 vs 0.6) 0.5, (0.9 vs 0.2) 1, (0.9 vs 0.6) 1, giving 3.5 / 4.
    assert roc_auc([0, 0, 1, 1], [0.2, 0.6, 0.6, 0.9]) == pytest.approx(0.875)
    assert roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for trial in range(10):
        labels = rng.integers(0, 2, size=60)
        labels[:2] = [0, 1]
        scores = np.round(rng.random(60) + 0.4 * labels, 1)
        assert roc_auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores)), f"trial {trial}"


def test_roc_curve_hand_example():
    fpr, tpr, thresholds = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])

    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0.0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=80)
    scores = np.round(rng.random(80) + 0.3 * labels, 1)

    fpr, tpr, thresholds = roc_curve(labels, scores)
    expected_fpr, expected_tpr, expected_thresholds = sklearn_roc_curve(labels, scores, drop_intermediate=False)

    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(tpr, expected_tpr)
    np.testing.assert_allclose(thresholds, expected_thresholds)


def test_roc_curve_area_equals_auc():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=50)
    scores = np.round(rng.random(50) + 0.3 * labels, 1)

    fpr, tpr, _ = roc_curve(labels, scores)

    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))


def test_auc_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="must be 0 or 1"):
        roc_auc([0, 1, 2], [0.1, 0.2, 0.3])


def test_auc_rejects_single_class():
    with pytest.raises(ValueError, match="needs both classes"):
        roc_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_auc_rejects_length_mismatch():
    with pytest.raises(ValueError, match="shape of labels"):
        roc_auc([0, 1, 1], [0.1, 0.2])


def test_multiclass_auc_matches_sklearn():
    rng = np.random.default_rng(3)
    labels = np.r_[0, 1, 2, rng.integers(0, 3, size=57)]
    logits = rng.normal(size=(60, 3)) + 1.5 * np.eye(3)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probabilities = np.round(probabilities, 2)
    probabilities /= probabilities.sum(axis=1, keepdims=True)

    expected = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")

    assert multiclass_auc(labels, probabilities) == pytest.approx(expected)


def test_multiclass_auc_skips_absent_class():
    labels = np.array([0, 0, 1, 1])
    probabilities = np.array([[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.4, 0.4, 0.2], [0.1, 0.8, 0.1]])
    # Class 0 vs rest: positives 0.7, 0.3 against 0.4, 0.1 win 3 of 4 pairs (0.75).
    # Class 1 vs rest: positives 0.4, 0.8 against 0.2, 0.5 win 3 of 4 pairs (0.75).
    # Class 2 has no case and is skipped, so the macro mean is 0.75.
    assert multiclass_auc(labels, probabilities) == pytest.approx(0.75)


def test_multiclass_auc_rejects_bad_index():
    with pytest.raises(ValueError, match="class indices 0..1"):
        multiclass_auc([0, 1, 2], np.full((3, 2), 0.5))


# ---------------------------------------------------------------------------
# Bootstrap confidence interval


def binary_cohort(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``size`` balanced labels and scores shifted up by 1 for positives (AUC about 0.76)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(size) % 2
    return labels, rng.normal(size=size) + labels


def test_bootstrap_interval_contains_auc():
    labels, scores = binary_cohort(60, seed=4)

    auc, low, high = bootstrap_auc(labels, scores, samples=500)

    assert auc == pytest.approx(roc_auc(labels, scores))
    assert low < auc
    assert auc < high


def test_bootstrap_reproducible_with_seed():
    labels, scores = binary_cohort(40, seed=5)

    first = bootstrap_auc(labels, scores, samples=300, seed=7)
    second = bootstrap_auc(labels, scores, samples=300, seed=7)
    other = bootstrap_auc(labels, scores, samples=300, seed=8)

    assert first == second
    assert first[1:] != other[1:]


def test_bootstrap_narrows_with_cases():
    small_labels, small_scores = binary_cohort(40, seed=6)
    large_labels, large_scores = binary_cohort(640, seed=6)

    _, small_low, small_high = bootstrap_auc(small_labels, small_scores, samples=400)
    _, large_low, large_high = bootstrap_auc(large_labels, large_scores, samples=400)

    # The width shrinks roughly as 1 / sqrt(N), so 16 times the cases should give about a quarter.
    assert large_high - large_low < 0.5 * (small_high - small_low)


def test_bootstrap_redraws_rare_class():
    # With one positive in 12 cases, about 35 % of resamples miss it and are redrawn.
    labels = np.array([1] + [0] * 11)
    scores = np.linspace(0.0, 1.0, 12)

    auc, low, high = bootstrap_auc(labels, scores, samples=200)

    assert auc == pytest.approx(0.0)
    assert low == pytest.approx(0.0)
    assert high == pytest.approx(0.0)


def test_bootstrap_multiclass_interval():
    rng = np.random.default_rng(9)
    labels = np.arange(90) % 3
    probabilities = rng.random((90, 3)) + 0.4 * np.eye(3)[labels]

    auc, low, high = bootstrap_auc(labels, probabilities, samples=200)

    assert auc == pytest.approx(multiclass_auc(labels, probabilities))
    assert low < auc
    assert auc < high


def test_bootstrap_rejects_bad_confidence():
    labels, scores = binary_cohort(10, seed=0)

    with pytest.raises(ValueError, match="confidence must lie in"):
        bootstrap_auc(labels, scores, confidence=95)


# ---------------------------------------------------------------------------
# Youden's J


def test_youden_hand_example_tie():
    # Threshold 0.7 gives sensitivity 2/3 and specificity 1, threshold 0.4 gives 1 and 2/3: both
    # have J = 2/3 and the higher threshold wins.
    labels = [0, 0, 0, 1, 1, 1]
    scores = [0.1, 0.3, 0.6, 0.4, 0.7, 0.9]

    point = youden_point(labels, scores)

    assert point["threshold"] == pytest.approx(0.7)
    assert point["sensitivity"] == pytest.approx(2.0 / 3.0)
    assert point["specificity"] == pytest.approx(1.0)
    assert point["youden_j"] == pytest.approx(2.0 / 3.0)


def test_youden_perfect_separation():
    point = youden_point([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.3, 0.6, 0.8, 0.9])

    assert point["threshold"] == pytest.approx(0.6)
    assert point["youden_j"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------
# Cluster distances


def test_cluster_distances_on_line():
    # Class 0 at x = 0, 1, 3: pair distances 1, 3, 2. Class 1 at x = 10, 12: pair distance 2.
    # Between classes: 10, 12, 9, 11, 7, 9 (sum 58).
    features = np.array([[0.0], [1.0], [3.0], [10.0], [12.0]])
    labels = np.array([0, 0, 0, 1, 1])

    result = cluster_distances(features, labels)
    class_zero = result["per_class"][0]
    class_one = result["per_class"][1]

    assert class_zero["count"] == 3
    assert class_zero["intra_mean"] == pytest.approx(2.0)
    assert class_zero["intra_std"] == pytest.approx(math.sqrt(2.0 / 3.0))
    assert class_zero["inter_mean"] == pytest.approx(58.0 / 6.0)
    assert class_zero["inter_std"] == pytest.approx(np.std([10, 12, 9, 11, 7, 9]))
    assert class_one["intra_mean"] == pytest.approx(2.0)
    assert class_one["intra_std"] == pytest.approx(0.0)
    assert class_one["inter_mean"] == pytest.approx(58.0 / 6.0)
    assert result["intra"] == pytest.approx(2.0)
    assert result["inter"] == pytest.approx(58.0 / 6.0)


def test_cluster_single_point_class():
    features = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    labels = np.array(["a", "a", "b"])

    result = cluster_distances(features, labels)

    assert result["per_class"]["a"]["intra_mean"] == pytest.approx(5.0)
    assert result["per_class"]["b"]["count"] == 1
    assert math.isnan(result["per_class"]["b"]["intra_mean"])
    assert math.isnan(result["per_class"]["b"]["intra_std"])
    assert result["per_class"]["b"]["inter_mean"] == pytest.approx(7.5)
    assert result["intra"] == pytest.approx(5.0)


def test_cluster_chunks_match_brute_force(monkeypatch):
    monkeypatch.setattr(metrics, "_DISTANCE_CHUNK", 3)
    rng = np.random.default_rng(10)
    features = rng.normal(size=(23, 4))
    labels = np.arange(23) % 3

    result = cluster_distances(features, labels)

    for class_value in range(3):
        members = features[labels == class_value]
        others = features[labels != class_value]
        intra = pdist(members)
        inter = cdist(members, others).ravel()
        stats = result["per_class"][class_value]
        assert stats["intra_mean"] == pytest.approx(intra.mean()), f"class {class_value}"
        assert stats["intra_std"] == pytest.approx(intra.std()), f"class {class_value}"
        assert stats["inter_mean"] == pytest.approx(inter.mean()), f"class {class_value}"
        assert stats["inter_std"] == pytest.approx(inter.std()), f"class {class_value}"


def test_cluster_rejects_single_class():
    with pytest.raises(ValueError, match="at least two classes"):
        cluster_distances(np.zeros((3, 2)), [1, 1, 1])


# ---------------------------------------------------------------------------
# Plots


def assert_png(path, folder) -> None:
    """Check that ``path`` is a readable non-empty PNG and that no temporary file is left in ``folder``."""
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 0
    assert image.shape[1] > 0
    assert sorted(entry.name for entry in folder.iterdir()) == [path.name]


def test_plot_roc_writes_png(tmp_path):
    labels, scores = binary_cohort(30, seed=11)
    fpr, tpr, _ = roc_curve(labels, scores)
    auc, low, high = bootstrap_auc(labels, scores, samples=100)
    curve = {"name": "lesion", "fpr": fpr, "tpr": tpr, "auc": auc, "low": low, "high": high}

    path = plots.plot_roc([curve, {**curve, "name": "no CI", "low": None}], tmp_path / "roc.png", "ROC")

    assert_png(path, tmp_path)


def test_roc_legend_format():
    curve = {"name": "DAGMaN", "auc": 0.8312, "low": 0.714, "high": 0.9249}

    assert plots._roc_legend(curve) == "DAGMaN: AUC 0.83 (95 % CI 0.71-0.92)"
    assert plots._roc_legend({"name": "x", "auc": 0.5}) == "x: AUC 0.50"


def test_plot_per_case_writes_png(tmp_path):
    path = plots.plot_per_case(["case 1", "case 2", "case 3"], [0.8, 0.6, float("nan")], tmp_path / "dice.png", "Dice", "Dice per case")

    assert_png(path, tmp_path)


def test_plot_embedding_writes_png(tmp_path):
    rng = np.random.default_rng(12)
    points = rng.normal(size=(30, 2))
    labels = np.arange(30) % 3

    path = plots.plot_embedding(points, labels, ["benign", "malignant", "normal"], tmp_path / "umap.png", "UMAP")

    assert_png(path, tmp_path)


def test_plot_lines_writes_png(tmp_path):
    series = {"head 1": [0.1, 0.3, 0.2], "head 2": [0.4, 0.2, 0.5]}

    path = plots.plot_lines([1, 2, 3], series, tmp_path / "heads.png", "stage", "attention entropy", "Heads")

    assert_png(path, tmp_path)


def test_plot_lines_rejects_length_mismatch(tmp_path):
    with pytest.raises(ValueError, match="one value per x"):
        plots.plot_lines([1, 2, 3], {"head 1": [0.1, 0.2]}, tmp_path / "bad.png", "stage", "value", "Heads")
