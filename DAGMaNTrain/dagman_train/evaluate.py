"""``dagman evaluate``: run a model bundle over a labelled datalist and write metrics, a report and plots.

Segmentation bundles get Dice and HD95 (mm) per case and label, and lesion detection by size with
lesions over 3 cc reported apart. Classification bundles get the AUC with its 95 % bootstrap interval,
sensitivity and specificity at the Youden point and the ROC curve.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dagman_core.bundle import load_bundle
from dagman_core.data.datalist import label_names, load_datalist
from dagman_core.data.geometry import resample_to_reference
from dagman_core.data.io import read_image, same_geometry
from dagman_core.inference.pipeline import classify_image, resolve_device, segment_image
from dagman_core.metrics import dice, hausdorff95, lesion_metrics

from .classify import case_id_of, classification_metrics, load_cases, roc_curves, write_predictions
from .plots import plot_per_case, plot_roc
from .runs import atomic_write_text, json_safe, progress_bar

logger = logging.getLogger(__name__)

# Lesions above this volume (cc) are reported apart from smaller ones.
LARGE_LESION_CC = 3.0


def evaluate_model(
    model_dir: str | Path,
    datalist: str | Path,
    output_dir: str | Path,
    split: str | None = None,
    device: str = "auto",
    label_field: str = "class",
    labels_csv: str | Path | None = None,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Evaluate a bundle on the labelled cases of ``datalist``; write ``metrics.json``, ``report.md`` and plots.

    Args:
        model_dir: a bundle folder written by ``dagman export``.
        datalist: segmentation cases need ``label`` (a label map). Classification cases need the label
            field (or ``labels_csv``), and a ``mask`` or ``point`` places the crop.
        output_dir: the folder for the results (created when missing).
        split: the datalist list to read; default ``validation`` when present, else ``training``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        seed: the bootstrap's seed.

    Returns:
        The content of ``metrics.json``.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    model, description = load_bundle(model_dir, torch_device)
    split = split or _default_split(datalist)
    if description["task"] == "classification":
        metrics = _evaluate_classification(model, description, datalist, output_dir, split, torch_device, label_field, labels_csv, seed, show_progress)
    else:
        metrics = _evaluate_segmentation(model, description, datalist, output_dir, split, torch_device, show_progress)
    metrics = {"model": {"name": description["name"], "folder": str(Path(model_dir).resolve()), "sha256": description["weights"]["sha256"]},
               "datalist": str(Path(datalist).resolve()), "split": split, **metrics}
    atomic_write_text(output_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
    atomic_write_text(output_dir / "report.md", _report(metrics))
    return metrics


def _default_split(datalist: str | Path) -> str:
    content = json.loads(Path(datalist).read_text(encoding="utf-8"))
    return "validation" if content.get("validation") else "training"


def _evaluate_segmentation(model, description: dict, datalist, output_dir: Path, split: str, device, show_progress: bool) -> dict:
    """Segment every case and compare each foreground label with the reference label map."""
    cases = load_datalist(datalist, split, require_labels=True)
    labels = {label["value"]: label["name"] for label in description["labels"]}
    known = label_names(datalist)
    if known and any(known.get(value) not in (None, name) for value, name in labels.items()):
        logger.warning("the datalist names labels %s, the model %s; comparing by value", known, labels)
    rows = score_segmentation(model, description["preprocessing"], cases, labels, device, show_progress)
    summary = summarize_segmentation(rows, labels, output_dir)
    return {"task": "segmentation", "large_lesion_cc": LARGE_LESION_CC, "summary": summary, "cases": rows}


def score_segmentation(model, preprocessing: dict, cases: list[dict], labels: dict[int, str], device, show_progress: bool = True) -> list[dict]:
    """Segment each case with the sliding-window inference of ``dagman infer`` and score every label.

    Args:
        model: a segmenter in eval mode on ``device``.
        preprocessing: the bundle's ``preprocessing`` section.
        cases: datalist entries with ``image`` and ``label``.
        labels: the foreground label values and names to score.

    Returns:
        One row per case: ``id``, ``image`` and per label name its ``dice``, ``hd95_mm`` (None where
        undefined), ``reference_voxels`` and ``lesions`` (``lesion_metrics``).
    """
    rows = []
    bar = progress_bar(len(cases), "evaluate", show_progress)
    try:
        for entry in cases:
            prediction, _ = segment_image(model, preprocessing, read_image(entry["image"]), device)
            reference = read_image(entry["label"])
            if not same_geometry(reference, prediction):
                reference = resample_to_reference(reference, prediction, is_label=True)
            predicted = sitk.GetArrayFromImage(prediction).transpose(2, 1, 0)
            expected = sitk.GetArrayFromImage(reference).transpose(2, 1, 0)
            spacing = prediction.GetSpacing()

            row = {"id": case_id_of(entry), "image": entry["image"], "labels": {}}
            for value, name in labels.items():
                row["labels"][name] = {
                    "dice": dice(predicted == value, expected == value),
                    "hd95_mm": _finite_or_none(hausdorff95(predicted == value, expected == value, spacing)),
                    "reference_voxels": int((expected == value).sum()),
                    "lesions": lesion_metrics(predicted == value, expected == value, spacing, LARGE_LESION_CC),
                }
            rows.append(row)
            bar.update(1)
    finally:
        bar.close()
    return rows


def summarize_segmentation(rows: list[dict], labels: dict[int, str], output_dir: Path | None = None, prefix: str = "dice_per_case") -> dict:
    """Return per label the mean Dice, HD95 and lesion detection by size; plot Dice per case into ``output_dir``."""
    summary = {}
    for value, name in labels.items():
        dices = np.asarray([row["labels"][name]["dice"] for row in rows])
        distances = [row["labels"][name]["hd95_mm"] for row in rows if row["labels"][name]["hd95_mm"] is not None]
        per_size = {}
        for size in ("small", "large"):
            found = [lesion for row in rows for lesion in row["labels"][name]["lesions"]["lesions"] if lesion["size"] == size]
            per_size[size] = {
                "lesions": len(found),
                "detected": int(sum(lesion["detected"] for lesion in found)),
                "mean_dice": float(np.mean([lesion["dice"] for lesion in found])) if found else None,
            }
        summary[name] = {
            "dice_mean": float(dices.mean()),
            "dice_std": float(dices.std()),
            "hd95_mm_mean": float(np.mean(distances)) if distances else None,
            "hd95_mm_median": float(np.median(distances)) if distances else None,
            "hd95_undefined_cases": len(rows) - len(distances),
            "lesions_by_size": per_size,
            "false_positive_components": int(sum(row["labels"][name]["lesions"]["false_positive_components"] for row in rows)),
        }
        if output_dir is not None:
            suffix = "" if value == min(labels) else f"_{_slug(name)}"
            path = output_dir / f"{prefix}{suffix}.png"
            plot_per_case([row["id"] for row in rows], dices.tolist(), path, "Dice", f"{name}: Dice per case", ylim=(0.0, 1.0))
    return summary


def _evaluate_classification(model, description, datalist, output_dir: Path, split: str, device, label_field, labels_csv, seed, show_progress) -> dict:
    """Classify every case and compute the AUC, its interval, the Youden point and the ROC curve."""
    cases, names = load_cases(datalist, label_field, labels_csv, split)
    model_names = {label["value"]: label["name"] for label in description["labels"]}
    if len(model_names) != len(names):
        raise ValueError(f"the model has {len(model_names)} classes {list(model_names.values())}, the datalist {len(names)}: {list(names.values())}")

    probabilities = []
    crops = []
    bar = progress_bar(len(cases), "evaluate", show_progress)
    try:
        for case in cases:
            mask = case.entry.get("mask")
            result, _, crop = classify_image(model, description, read_image(case.entry["image"]), mask, case.entry.get("point"), device)
            probabilities.append(result)
            crops.append(crop.describe())
            bar.update(1)
    finally:
        bar.close()
    probabilities = np.stack(probabilities)
    labels = np.asarray([case.label for case in cases])

    metrics = classification_metrics(labels, probabilities, model_names, seed)
    write_predictions(output_dir / "predictions.csv", cases, probabilities, model_names)
    plot_roc(roc_curves(metrics), output_dir / "roc.png", f"{description['name']}: ROC on {len(cases)} cases")
    metrics["crops"] = {case.case_id: crop for case, crop in zip(cases, crops)}
    return {"task": "classification", **metrics}


def _finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _slug(name: str) -> str:
    return "".join(character if character.isalnum() else "_" for character in name.lower()).strip("_")


def _report(metrics: dict) -> str:
    """Return ``report.md``: the model, the data and a table of the metrics."""
    lines = [f"# Evaluation of {metrics['model']['name']}", "", f"Datalist: `{metrics['datalist']}` (list `{metrics['split']}`).", ""]
    if metrics["task"] == "segmentation":
        lines += ["A lesion is a connected component of the reference; it counts as detected when at least one predicted "
                  "voxel lies inside it. False positives are predicted components that touch no lesion.", "",
                  "| label | cases | Dice (mean ± sd) | HD95 mm (mean / median) | lesions ≤ 3 cc detected | lesions > 3 cc detected | false positives |",
                  "|---|---:|---|---|---|---|---:|"]
        cases = len(metrics["cases"])
        for name, entry in metrics["summary"].items():
            small, large = entry["lesions_by_size"]["small"], entry["lesions_by_size"]["large"]
            hd95 = "n/a" if entry["hd95_mm_mean"] is None else f"{entry['hd95_mm_mean']:.1f} / {entry['hd95_mm_median']:.1f}"
            lines.append(f"| {name} | {cases} | {entry['dice_mean']:.3f} ± {entry['dice_std']:.3f} | {hd95} | "
                         f"{small['detected']} of {small['lesions']} | {large['detected']} of {large['lesions']} | "
                         f"{entry['false_positive_components']} |")
        lines += ["", "| case | " + " | ".join(f"{name} Dice | {name} HD95 mm" for name in metrics["summary"]) + " |",
                  "|---|" + "---:|---:|" * len(metrics["summary"])]
        for row in metrics["cases"]:
            cells = []
            for name in metrics["summary"]:
                entry = row["labels"][name]
                cells += [f"{entry['dice']:.3f}", "n/a" if entry["hd95_mm"] is None else f"{entry['hd95_mm']:.1f}"]
            lines.append(f"| {row['id']} | " + " | ".join(cells) + " |")
        lines += ["", "![Dice per case](dice_per_case.png)", ""]
        return "\n".join(lines)

    low, high = metrics["auc_ci95"]
    lines += [f"{metrics['cases']} cases. AUC {metrics['auc']:.3f} (95 % bootstrap CI {low:.3f}-{high:.3f}), accuracy {metrics['accuracy']:.3f}.", "",
              "| class | cases | AUC (one vs rest) | sensitivity | specificity | Youden threshold |", "|---|---:|---:|---:|---:|---:|"]
    for name, entry in metrics["per_class"].items():
        lines.append(f"| {name} | {entry['cases']} | {entry['auc']:.3f} | {entry['sensitivity']:.3f} | {entry['specificity']:.3f} | {entry['youden_threshold']:.3f} |")
    lines += ["", "Predictions per case: `predictions.csv`.", "", "![ROC](roc.png)", ""]
    return "\n".join(lines)
