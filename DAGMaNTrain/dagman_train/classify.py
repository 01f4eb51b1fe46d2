"""Classification on top of a pretrained encoder: linear probing, full fine-tuning, k-fold and few-shot runs.

A run folder contains the model trained on every selected case (``classifier.safetensors``), its
``finetune.json`` and ``config.yaml``. With ``folds`` it also contains a stratified k-fold
cross-validation: each fold's held-out predictions, the pooled out-of-fold AUC with its 95 %
bootstrap interval, sensitivity and specificity at the Youden point, and the ROC plot.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, RandFlip, RandScaleIntensity, RandShiftIntensity
from safetensors.torch import load_file

from dagman_core.config import DAGMaNConfig
from dagman_core.data.crops import Crop, classification_crop
from dagman_core.data.datalist import load_datalist
from dagman_core.metrics import bootstrap_auc, roc_auc, roc_curve, youden_point
from dagman_core.models.classification import DAGMaNClassifier

from .plots import plot_roc
from .pretrain import ENCODER_FILE, parameter_groups
from .runs import MetricsLog, atomic_save_safetensors, atomic_write_text, json_safe, progress_bar, read_run_config, seed_everything, write_config

logger = logging.getLogger(__name__)

MODEL_FILE = "classifier.safetensors"
RUN_INFO = "finetune.json"
MODES = ("linear", "full")
DEFAULT_STEPS = {"linear": 300, "full": 200}
DEFAULT_LR = {"linear": 1e-3, "full": 1e-4}


@dataclass
class Case:
    """One labelled case: its datalist entry, class value and, once loaded, its crop."""

    entry: dict
    label: int
    case_id: str
    group: str
    crop: Crop | None = None


def case_id_of(entry: dict) -> str:
    """Return an entry's ``id``, or its image file name without the suffix."""
    if entry.get("id"):
        return str(entry["id"])
    name = Path(entry["image"]).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_cases(
    datalist: str | Path, label_field: str = "class", labels_csv: str | Path | None = None, split: str = "training"
) -> tuple[list[Case], dict[int, str]]:
    """Read the labelled cases of a classification datalist's ``split`` list; return them and the class names.

    Labels come from the entries' ``label_field`` or, with ``labels_csv``, from a CSV file whose
    first column is the case id and whose second is the label. Integer labels keep their values;
    other labels are numbered in sorted order. Names come from the datalist's ``classes`` mapping.
    """
    entries = load_datalist(datalist, split)
    content = json.loads(Path(datalist).read_text(encoding="utf-8"))
    for entry in entries:
        if entry.get("mask") and not Path(entry["mask"]).is_absolute():
            entry["mask"] = str(Path(datalist).parent / entry["mask"])

    if labels_csv is not None:
        with open(labels_csv, newline="", encoding="utf-8") as stream:
            rows = [row for row in csv.reader(stream) if row and not row[0].startswith("#")]
        if rows and rows[0][0].strip().lower() in ("id", "case", "case_id"):
            rows = rows[1:]
        table = {row[0].strip(): row[1].strip() for row in rows if len(row) >= 2}
        raw = {}
        for entry in entries:
            case_id = case_id_of(entry)
            if case_id not in table:
                raise ValueError(f"case {case_id!r} of {datalist} has no row in {labels_csv}; add 'case_id,label' for it")
            raw[case_id] = table[case_id]
    else:
        raw = {}
        for number, entry in enumerate(entries):
            if label_field not in entry:
                raise ValueError(f"entry {number} of {datalist} has no {label_field!r} field; name the label field with --label-field or give --labels-csv")
            raw[case_id_of(entry)] = entry[label_field]

    values = list(raw.values())
    if all(isinstance(value, int) or str(value).lstrip("-").isdigit() for value in values):
        numbering = {value: int(value) for value in values}
    else:
        numbering = {value: index for index, value in enumerate(sorted({str(value) for value in values}))}
        numbering = {value: numbering[str(value)] for value in values}
    names = {int(key): str(name) for key, name in (content.get("classes") or {}).items()}
    for value, number in numbering.items():
        names.setdefault(number, str(value))

    cases = [
        Case(entry, numbering[raw[case_id_of(entry)]], case_id_of(entry), str(entry.get("group", case_id_of(entry))))
        for entry in entries
    ]
    present = sorted({case.label for case in cases})
    if len(present) < 2:
        raise ValueError(f"the cases of {datalist} hold only class {present}; classification needs at least two classes")
    if sorted(names) != list(range(len(names))):
        raise ValueError(f"class values must be 0..{len(names) - 1} without gaps, got {sorted(names)}; renumber them in the datalist or CSV")
    return cases, dict(sorted(names.items()))


def load_crops(cases: list[Case], config: DAGMaNConfig, crop_mode: str = "auto", show_progress: bool = True) -> None:
    """Cut every case's crop with the run's preprocessing (RAS, spacing, HU window, crop size)."""
    bar = progress_bar(len(cases), "crops", show_progress)
    try:
        for case in cases:
            if case.crop is None:
                point = case.entry.get("point")
                case.crop = classification_crop(
                    case.entry["image"], config.data.spacing_mm, tuple(config.data.hu_window), config.data.crop_size,
                    crop_mode, mask=case.entry.get("mask"), point_ras=point,
                )
            bar.update(1)
    finally:
        bar.close()


def check_folds(labels: np.ndarray, folds: int) -> None:
    """Raise unless every class has at least ``folds`` cases (and ``folds`` is at least 2)."""
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if folds < 2 or folds > smallest:
        hint = f"use --folds {smallest} or fewer" if smallest >= 2 else "add cases to the smallest class"
        raise ValueError(f"--folds {folds} needs at least {folds} cases of every class, but the smallest class has {smallest}; {hint}")


def stratified_folds(labels: np.ndarray, groups: list[str], folds: int, seed: int) -> list[np.ndarray]:
    """Return the held-out indices of each of ``folds`` stratified folds.

    A patient's cases (``group``) stay in one fold when there are enough patients and every
    held-out fold still contains every class. Otherwise the folds ignore patients, with a warning.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    check_folds(labels, folds)
    indices = np.arange(len(labels))
    if len(set(groups)) < folds:
        logger.warning("the cases come from %d patients, fewer than %d folds; folds mix patients", len(set(groups)), folds)
    else:
        grouped = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
        splits = [test for _, test in grouped.split(indices, labels, groups)]
        if all(len(np.unique(labels[test])) == len(np.unique(labels)) for test in splits):
            return splits
        logger.warning("keeping each patient in one fold leaves a class out of a fold; folds mix patients instead")
    plain = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [test for _, test in plain.split(indices, labels)]


def few_shot(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Return a stratified, seeded ``fraction`` of ``indices``, with at least one case per class."""
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must lie in (0, 1], got {fraction}")
    random = np.random.default_rng(seed)
    chosen = []
    for value in np.unique(labels[indices]):
        members = indices[labels[indices] == value]
        count = max(1, int(round(fraction * len(members))))
        chosen.extend(random.choice(members, size=count, replace=False).tolist())
    return np.asarray(sorted(chosen))


def build_classifier(config: DAGMaNConfig, encoder_state: dict, num_classes: int, pooling: str, mode: str) -> DAGMaNClassifier:
    """Build a classifier with the pretrained encoder; linear probing freezes the encoder."""
    model = DAGMaNClassifier(config, num_classes, pooling, drop_path=0.1 if mode == "full" else 0.0)
    model.load_pretrained_encoder(encoder_state)
    if mode == "linear":
        model.encoder.requires_grad_(False)
    return model


@torch.no_grad()
def encode_crops(model: DAGMaNClassifier, crops: list[torch.Tensor], device: torch.device, batch_size: int = 4) -> torch.Tensor:
    """Return the pooled features (N, D) of (1, X, Y, Z) crops, the encoder in eval mode."""
    was_training = model.training
    model.eval()
    features = []
    for start in range(0, len(crops), batch_size):
        batch = torch.stack(crops[start : start + batch_size]).to(device)
        features.append(model.encode(batch)[0].float().cpu())
    model.train(was_training)
    return torch.cat(features)


def train_classifier(
    model: DAGMaNClassifier,
    crops: list[torch.Tensor],
    labels: np.ndarray,
    mode: str,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    metrics: MetricsLog | None = None,
    show_progress: bool = False,
) -> float:
    """Train ``model`` on crops (1, X, Y, Z) with cross-entropy; return the last loss.

    Both modes first standardise the pooled features with their mean and standard deviation over the
    training crops. Linear probing then trains the linear layer on those fixed features, all crops
    per step. Full fine-tuning trains every layer on ``batch_size`` random crops per step with random
    flips and intensity changes, the linear layer at ten times the encoder's learning rate.
    """
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    features = encode_crops(model, crops, device)
    model.feature_mean.copy_(features.mean(dim=0))
    model.feature_std.copy_(features.std(dim=0, unbiased=False).clamp_min(1e-6))
    targets = torch.as_tensor(labels, dtype=torch.long)

    if mode == "linear":
        optimizer = torch.optim.AdamW(model.head.parameters(), lr=lr, weight_decay=1e-4)
        features, targets = features.to(device), targets.to(device)
    else:
        groups = parameter_groups(model.encoder)
        head = [{"params": list(model.head.parameters()), "lr": lr * 10}]
        optimizer = torch.optim.AdamW([*groups, *head], lr=lr, weight_decay=1e-5)
        augment = Compose([
            RandFlip(prob=0.5, spatial_axis=0), RandFlip(prob=0.5, spatial_axis=1), RandFlip(prob=0.5, spatial_axis=2),
            RandScaleIntensity(factors=0.1, prob=0.5), RandShiftIntensity(offsets=0.1, prob=0.5),
        ]).set_random_state(seed)
        model.train()

    bar = progress_bar(steps, f"{mode} classifier", show_progress)
    loss_value = float("nan")
    try:
        for step in range(steps):
            if mode == "linear":
                loss = F.cross_entropy(model.head((features - model.feature_mean) / model.feature_std), targets)
            else:
                chosen = torch.randint(len(crops), (min(batch_size, len(crops)),), generator=generator)
                images = torch.stack([torch.as_tensor(augment(crops[int(index)])) for index in chosen]).to(device)
                loss = F.cross_entropy(model(images), targets[chosen].to(device))
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"classification loss is {loss_value} at step {step}; lower the learning rate (--lr)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 3.0)
            optimizer.step()
            if metrics is not None:
                metrics.write({"step": step, "loss": round(loss_value, 6)})
            bar.set_postfix(loss=f"{loss_value:.3f}")
            bar.update(1)
    finally:
        bar.close()
    model.eval()
    return loss_value


@torch.no_grad()
def predict(model: DAGMaNClassifier, crops: list[torch.Tensor], device: torch.device) -> np.ndarray:
    """Return class probabilities (N, C) of crops (1, X, Y, Z)."""
    model.eval()
    features = encode_crops(model, crops, device)
    return torch.softmax(model.classify_features(features.to(device)).float(), dim=1).cpu().numpy()


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, names: dict[int, str], seed: int = 0) -> dict:
    """Return AUC with its 95 % bootstrap interval, accuracy, and per class the Youden point and ROC.

    With two classes the score is the probability of class 1. With more, every class is scored one
    against the rest and the AUC is their macro mean.
    """
    labels = np.asarray(labels)
    binary = probabilities.shape[1] == 2
    auc, low, high = bootstrap_auc(labels, probabilities[:, 1] if binary else probabilities, seed=seed)
    result = {
        "cases": int(len(labels)),
        "auc": float(auc),
        "auc_ci95": [float(low), float(high)],
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "per_class": {},
    }
    for value in ([1] if binary else sorted(names)):
        positives = (labels == value).astype(int)
        if positives.min() == positives.max():
            continue
        point = youden_point(positives, probabilities[:, value])
        fpr, tpr, _ = roc_curve(positives, probabilities[:, value])
        result["per_class"][names[value]] = {
            "value": int(value),
            "cases": int(positives.sum()),
            "auc": float(roc_auc(positives, probabilities[:, value])),
            "sensitivity": float(point["sensitivity"]),
            "specificity": float(point["specificity"]),
            "youden_threshold": float(point["threshold"]),
            "roc": {"fpr": [round(float(x), 6) for x in fpr], "tpr": [round(float(y), 6) for y in tpr]},
        }
    return result


def roc_curves(metrics: dict, label_prefix: str = "") -> list[dict]:
    """Return the ROC curves of ``classification_metrics`` output in the form ``plot_roc`` draws."""
    binary = len(metrics["per_class"]) == 1
    curves = []
    for name, entry in metrics["per_class"].items():
        curve = {"name": f"{label_prefix}{name}", "fpr": entry["roc"]["fpr"], "tpr": entry["roc"]["tpr"]}
        if binary:
            curve.update(auc=metrics["auc"], low=metrics["auc_ci95"][0], high=metrics["auc_ci95"][1])
        else:
            curve.update(auc=entry["auc"], low=None, high=None)
        curves.append(curve)
    return curves


def write_predictions(path: Path, cases: list[Case], probabilities: np.ndarray, names: dict[int, str], folds: list[int] | None = None) -> None:
    """Write one CSV row per case: id, true class, predicted class, fold and each class's probability."""
    header = ["id", "label", "predicted", *(["fold"] if folds is not None else []), *[f"p_{names[value]}" for value in sorted(names)]]
    lines = [",".join(header)]
    for row, case in enumerate(cases):
        fields = [case.case_id, names[case.label], names[int(probabilities[row].argmax())]]
        if folds is not None:
            fields.append(str(folds[row]))
        fields += [repr(float(value)) for value in probabilities[row]]
        lines.append(",".join(fields))
    atomic_write_text(path, "\n".join(lines) + "\n")


def finetune_classification(
    pretrained_run: str | Path,
    datalist: str | Path,
    output_dir: str | Path,
    mode: str = "linear",
    pooling: str = "cls",
    folds: int | None = None,
    fraction: float | None = None,
    steps: int | None = None,
    lr: float | None = None,
    batch_size: int = 4,
    crop_mode: str = "auto",
    label_field: str = "class",
    labels_csv: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict:
    """Train a classifier on a pretrained encoder and write a run folder; return ``finetune.json``.

    Args:
        pretrained_run: a pretraining run folder (``encoder.safetensors``, ``config.yaml``).
        datalist: a classification datalist (``image``, the label field, optional ``mask`` or ``point``).
        output_dir: the run folder to write.
        mode: ``linear`` (frozen encoder) or ``full`` (every layer trained).
        pooling: ``cls`` (SA [CLS]) or ``stage4`` (pooled deepest tokens).
        folds: run a stratified k-fold cross-validation first (at least 2).
        fraction: train on this stratified, seeded share of the training cases (few-shot).
        steps, lr, batch_size: optimisation; defaults 300 steps at 1e-3 (linear) or 200 at 1e-4 (full).
        crop_mode: ``auto``, ``mask``, ``point`` or ``whole`` (see ``classification_crop``).
        label_field, labels_csv: where the labels come from (see ``load_cases``).
    """
    if mode not in MODES:
        raise ValueError(f"invalid mode {mode!r}; valid choices: {', '.join(MODES)}")
    pretrained_run, run_dir = Path(pretrained_run), Path(output_dir)
    encoder_path = pretrained_run / ENCODER_FILE
    if not encoder_path.exists():
        raise FileNotFoundError(f"pretrained encoder not found: {encoder_path}; run 'dagman pretrain' first")
    config = read_run_config(pretrained_run)
    encoder_state = load_file(str(encoder_path))
    steps = DEFAULT_STEPS[mode] if steps is None else steps
    lr = DEFAULT_LR[mode] if lr is None else lr
    torch_device = torch.device(device)
    seed_everything(seed)
    started = time.perf_counter()

    cases, names = load_cases(datalist, label_field, labels_csv)
    labels = np.asarray([case.label for case in cases])
    if folds:
        check_folds(labels, folds)
    if fraction is not None and not 0 < fraction <= 1:
        raise ValueError(f"--fraction must lie in (0, 1], got {fraction}")
    load_crops(cases, config, crop_mode, show_progress)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)

    def fit(indices: np.ndarray, fold_seed: int, metrics: MetricsLog | None = None) -> DAGMaNClassifier:
        torch.manual_seed(fold_seed)
        model = build_classifier(config, encoder_state, len(names), pooling, mode)
        crops = [cases[index].crop.image for index in indices]
        train_classifier(model, crops, labels[indices], mode, steps, lr, batch_size, fold_seed, torch_device, metrics, show_progress)
        return model

    summary_cv = None
    if folds:
        summary_cv = _cross_validate(cases, labels, names, folds, fraction, seed, fit, torch_device, run_dir)

    selected = np.arange(len(cases)) if fraction is None else few_shot(np.arange(len(cases)), labels, fraction, seed)
    metrics = MetricsLog(run_dir / "metrics.jsonl", append=False)
    try:
        model = fit(selected, seed, metrics)
    finally:
        metrics.close()
    atomic_save_safetensors(model.state_dict(), run_dir / MODEL_FILE)

    summary = {
        "task": "classification",
        "architecture": DAGMaNClassifier.architecture,
        "mode": mode,
        "pooling": pooling,
        "num_classes": len(names),
        "labels": {str(value): name for value, name in sorted(names.items())},
        "crop": {"mode": crop_mode, "size_voxels": config.data.crop_size, "spacing_mm": config.data.spacing_mm},
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size if mode == "full" else None,
        "seed": seed,
        "fraction": fraction,
        "seconds": round(time.perf_counter() - started, 2),
        "pretrained_run": str(pretrained_run.resolve()),
        "training_data": {
            "datalist": str(Path(datalist).resolve()),
            "cases": int(len(selected)),
            "per_class": {names[value]: int(np.sum(labels[selected] == value)) for value in sorted(names)},
        },
    }
    if summary_cv is not None:
        summary["cross_validation"] = summary_cv
    atomic_write_text(run_dir / RUN_INFO, json.dumps(json_safe(summary), indent=2) + "\n")
    return summary


def _cross_validate(cases, labels, names, folds, fraction, seed, fit, device, run_dir: Path) -> dict:
    """Train one model per fold, predict its held-out cases and write the pooled metrics and ROC plot."""
    splits = stratified_folds(labels, [case.group for case in cases], folds, seed)
    probabilities = np.zeros((len(cases), len(names)))
    fold_of = np.zeros(len(cases), dtype=int)
    per_fold = []
    for number, held_out in enumerate(splits):
        training = np.setdiff1d(np.arange(len(cases)), held_out)
        if fraction is not None:
            training = few_shot(training, labels, fraction, seed + number)
        logger.info("fold %d (%d of %d): %d training and %d held-out cases", number, number + 1, folds, len(training), len(held_out))
        model = fit(training, seed + 1000 * (number + 1))
        probabilities[held_out] = predict(model, [cases[index].crop.image for index in held_out], device)
        fold_of[held_out] = number
        fold_labels = labels[held_out]
        fold_accuracy = float(np.mean(probabilities[held_out].argmax(axis=1) == fold_labels))
        per_fold.append({"fold": number, "training_cases": int(len(training)), "held_out_cases": int(len(held_out)), "accuracy": fold_accuracy})

    cv_dir = run_dir / "cross_validation"
    metrics = classification_metrics(labels, probabilities, names, seed)
    metrics["folds"] = per_fold
    write_predictions(cv_dir / "predictions.csv", cases, probabilities, names, fold_of.tolist())
    atomic_write_text(cv_dir / "metrics.json", json.dumps(json_safe(metrics), indent=2) + "\n")
    plot_roc(roc_curves(metrics), cv_dir / "roc.png", f"{folds}-fold cross-validation, out-of-fold predictions")
    logger.info("cross-validation AUC %.3f (95 %% CI %.3f-%.3f)", metrics["auc"], *metrics["auc_ci95"])
    return {"folds": folds, "auc": metrics["auc"], "auc_ci95": metrics["auc_ci95"], "accuracy": metrics["accuracy"], "folder": "cross_validation"}


def load_classifier(run_dir: str | Path, device: str = "cpu") -> tuple[DAGMaNClassifier, dict]:
    """Load the classifier of a classification run folder; return ``(model, finetune.json content)``."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / RUN_INFO).read_text(encoding="utf-8"))
    model = DAGMaNClassifier(read_run_config(run_dir), int(info["num_classes"]), info["pooling"])
    model.load_state_dict(load_file(str(run_dir / MODEL_FILE)))
    return model.to(device).eval(), info
