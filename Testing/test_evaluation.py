"""Classification, evaluation, embedding and head diversity end to end, at tiny_cpu size on real CT."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file
from sklearn.metrics import roc_auc_score

from conftest import write_tumor_block
from dagman_core.bundle import load_bundle
from dagman_core.config import load_config
from dagman_core.data.crops import classification_crop, parse_point
from dagman_core.inference.pipeline import classify_image
from dagman_core.metrics import dice
from dagman_train.classify import few_shot, finetune_classification, load_cases, stratified_folds
from dagman_train.cli import main as dagman
from dagman_train.diagnose import diagnose_run
from dagman_train.embed import embed
from dagman_train.evaluate import evaluate_model
from dagman_train.export import export_run
from dagman_train.pretrain import pretrain
from dagman_train.proxy_tasks import build_proxy_tasks

ORGANS = ["liver", "spleen", "stomach", "vertebrae"]


@pytest.fixture(scope="module")
def organ_runs(ct_data: Path, tmp_path_factory) -> SimpleNamespace:
    """The organ-crop proxy task, a 2-step pretraining run and linear and full runs with 2 folds each."""
    folder = tmp_path_factory.mktemp("organs")
    datalist = build_proxy_tasks(ct_data, folder / "proxy", tasks=("organs",), progress=False)["organs"]
    pretrain(load_config("tiny_cpu"), datalist, folder / "pretrain", max_steps=2, show_progress=False)
    linear = finetune_classification(
        folder / "pretrain", datalist, folder / "linear", mode="linear", folds=2, steps=40, show_progress=False
    )
    full = finetune_classification(
        folder / "pretrain", datalist, folder / "full", mode="full", folds=2, steps=2, batch_size=2, show_progress=False
    )
    model = export_run(folder / "linear", folder / "model")
    return SimpleNamespace(folder=folder, datalist=datalist, linear=linear, full=full, model=model)


def read_predictions(path: Path) -> tuple[list[dict], np.ndarray, np.ndarray]:
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    labels = np.asarray([ORGANS.index(row["label"]) for row in rows])
    probabilities = np.asarray([[float(row[f"p_{name}"]) for name in ORGANS] for row in rows])
    return rows, labels, probabilities


def assert_png(path: Path) -> None:
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100
    assert image.shape[1] > 100


# ---------------------------------------------------------------------------------------------------
# Fine-tuning with cross-validation


@pytest.mark.parametrize("mode", ["linear", "full"])
def test_cross_validation_writes_every_file(organ_runs, mode: str):
    run = organ_runs.folder / mode
    summary = json.loads((run / "finetune.json").read_text())
    metrics = json.loads((run / "cross_validation" / "metrics.json").read_text())
    rows, labels, probabilities = read_predictions(run / "cross_validation" / "predictions.csv")

    assert summary["task"] == "classification"
    assert summary["mode"] == mode
    assert summary["labels"] == {str(value): name for value, name in enumerate(ORGANS)}
    assert summary["cross_validation"]["folds"] == 2
    assert len(rows) == 48
    assert len({row["id"] for row in rows}) == 48
    assert {row["fold"] for row in rows} == {"0", "1"}
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The pooled out-of-fold AUC is scikit-learn's macro one-vs-rest AUC of the written predictions.
    expected = roc_auc_score(labels, probabilities, multi_class="ovr", average="macro")
    assert metrics["auc"] == pytest.approx(expected, abs=1e-5)
    assert metrics["auc_ci95"][0] <= metrics["auc"] <= metrics["auc_ci95"][1]
    assert set(metrics["per_class"]) == set(ORGANS)
    assert_png(run / "cross_validation" / "roc.png")
    state = load_file(str(run / "classifier.safetensors"))
    assert state["head.weight"].shape == (4, 96)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == summary["steps"]


def test_linear_probe_keeps_encoder_frozen(organ_runs):
    encoder = load_file(str(organ_runs.folder / "pretrain" / "encoder.safetensors"))
    classifier = load_file(str(organ_runs.folder / "linear" / "classifier.safetensors"))

    for name, value in encoder.items():
        assert torch.equal(classifier[f"encoder.{name}"], value), name


def test_full_finetune_changes_encoder(organ_runs):
    encoder = load_file(str(organ_runs.folder / "pretrain" / "encoder.safetensors"))
    classifier = load_file(str(organ_runs.folder / "full" / "classifier.safetensors"))

    changed = [name for name, value in encoder.items() if not torch.equal(classifier[f"encoder.{name}"], value)]
    assert len(changed) > len(encoder) // 2


# ---------------------------------------------------------------------------------------------------
# evaluate, embed, diagnose and infer


def test_evaluate_classification_bundle(organ_runs, tmp_path: Path):
    code = dagman(["evaluate", "--model", str(organ_runs.model), "--datalist", str(organ_runs.datalist),
                   "--output", str(tmp_path), "--device", "cpu"])

    assert code == 0
    written = json.loads((tmp_path / "metrics.json").read_text())
    rows, labels, probabilities = read_predictions(tmp_path / "predictions.csv")
    assert written["task"] == "classification"
    assert written["cases"] == 48
    assert len(rows) == 48
    assert written["auc"] == pytest.approx(roc_auc_score(labels, probabilities, multi_class="ovr"), abs=1e-5)
    for name in ORGANS:
        entry = written["per_class"][name]
        assert 0.0 <= entry["sensitivity"] <= 1.0
        assert 0.0 <= entry["specificity"] <= 1.0
    report = (tmp_path / "report.md").read_text()
    assert "AUC" in report
    assert "liver" in report
    assert_png(tmp_path / "roc.png")


def test_embed_matches_pretrained_features(organ_runs, tmp_path: Path):
    code = dagman(["embed", "--run", str(organ_runs.folder / "pretrain"), "--datalist", str(organ_runs.datalist),
                   "--output", str(tmp_path / "run")])
    embed(organ_runs.datalist, tmp_path / "model", model_dir=organ_runs.model, show_progress=False)

    assert code == 0
    from_run = json.loads((tmp_path / "run" / "cluster_distances.json").read_text())
    run_features = np.load(tmp_path / "run" / "features.npz")
    model_features = np.load(tmp_path / "model" / "features.npz")
    assert run_features["features"].shape == (48, 96)
    # Linear probing leaves the encoder as pretrained, so the bundle's features are the run's.
    np.testing.assert_allclose(model_features["features"], run_features["features"], atol=1e-5)
    assert sorted(from_run["distances"]["per_class"]) == sorted(ORGANS)
    assert from_run["distances"]["intra"] > 0
    assert from_run["cases"] == 48
    assert len((tmp_path / "run" / "embedding.csv").read_text().splitlines()) == 49
    assert_png(tmp_path / "run" / "umap.png")


def test_too_many_folds_fail_clearly(organ_runs, tmp_path: Path, caplog):
    code = dagman(["finetune", "--task", "classification", "--pretrained", str(organ_runs.folder / "pretrain"),
                   "--datalist", str(organ_runs.datalist), "--output", str(tmp_path / "run"), "--folds", "13"])

    assert code == 1
    assert "--folds 13 needs at least 13 cases of every class" in caplog.text


def test_diagnose_writes_report_and_maps(organ_runs, tmp_path: Path):
    report = diagnose_run(organ_runs.folder / "pretrain", organ_runs.datalist, tmp_path, cases=2, progress=False)

    written = json.loads((tmp_path / "head_diversity.json").read_text())
    assert written["cases_used"] == 2
    assert [stage["num_heads"] for stage in written["stages"]][:4] == [1, 2, 4, 8]
    assert_png(tmp_path / "head_diversity.png")
    for case in report["cases"]:
        assert_png(tmp_path / f"attention_{case['id']}.png")


def test_infer_classification_on_real_ct(organ_runs, ct_data: Path, tmp_path: Path):
    image_path = ct_data / "totalsegmentator" / "abdomen_3mm" / "ct.nii.gz"
    reference = sitk.ReadImage(str(image_path))
    lps = reference.TransformContinuousIndexToPhysicalPoint([(size - 1) / 2 for size in reference.GetSize()])
    point = f"{-lps[0]:.1f},{-lps[1]:.1f},{lps[2]:.1f}"

    code = dagman(["infer", "--model", str(organ_runs.model), "--input", str(image_path), "--output", str(tmp_path),
                   "--point", point, "--device", "cpu", "--progress", "none"])

    assert code == 0
    result = json.loads((tmp_path / "result.json").read_text())
    model, description = load_bundle(organ_runs.model)
    expected, _, crop = classify_image(model, description, reference, point_ras=parse_point(point))
    assert result["task"] == "classification"
    assert list(result["probabilities"]) == ORGANS
    probabilities = np.asarray(list(result["probabilities"].values()))
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    assert result["predicted"]["name"] == ORGANS[int(np.argmax(expected))]
    assert result["crop"]["mode"] == "point"
    np.testing.assert_allclose(result["crop"]["center_ras_mm"], parse_point(point), atol=1.0)

    attention = sitk.ReadImage(str(tmp_path / "attention.nrrd"))
    assert attention.GetSize() == reference.GetSize()
    np.testing.assert_allclose(attention.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(attention.GetOrigin(), reference.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(attention.GetDirection(), reference.GetDirection(), atol=1e-6)
    # The attention covers the 128 mm crop around the point and nothing else.
    values = sitk.GetArrayFromImage(attention)
    inside = np.argwhere(values > 0)[:, ::-1]
    corners = np.asarray([reference.TransformIndexToPhysicalPoint([int(v) for v in index]) for index in (inside.min(0), inside.max(0))])
    extent = np.abs(corners[1] - corners[0])
    centre = corners.mean(axis=0) * np.array([-1.0, -1.0, 1.0])
    assert values.max() <= 1.0
    np.testing.assert_allclose(extent, 128.0, atol=2 * max(reference.GetSpacing()))
    np.testing.assert_allclose(centre, parse_point(point), atol=max(reference.GetSpacing()) + 2.0)
    assert crop.describe()["size_mm"] == [128.0, 128.0, 128.0]


def test_segmentation_evaluation_reports_lesions(trained_tumor_bundle: Path, ct_data: Path, tmp_path: Path):
    datalist = write_tumor_block(ct_data, tmp_path)
    lung1 = tmp_path / "lung1"
    lung1.mkdir()
    for name in ("image", "label"):
        volume = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / f"lung1_{name}.nrrd"))
        sitk.WriteImage(volume[130:300, 280:450, 20:48], str(lung1 / f"{name}.nrrd"))
    content = json.loads(datalist.read_text())
    content["training"].append({"image": "lung1/image.nrrd", "label": "lung1/label.nrrd", "id": "lung1"})
    datalist.write_text(json.dumps(content))

    metrics = evaluate_model(trained_tumor_bundle, datalist, tmp_path / "evaluation", device="cpu", show_progress=False)

    summary = metrics["summary"]["Lung tumor"]
    assert [case["id"] for case in metrics["cases"]] == ["block_image", "lung1"]
    assert summary["lesions_by_size"]["large"]["lesions"] == 1
    assert summary["lesions_by_size"]["small"]["lesions"] == 1
    # The Dice of a case is the Dice of the segmentation that 'dagman infer' writes for it.
    assert dagman(["infer", "--model", str(trained_tumor_bundle), "--input", str(tmp_path / "block_image.nrrd"),
                   "--output", str(tmp_path / "block"), "--device", "cpu", "--progress", "none"]) == 0
    segmentation = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "block" / "segmentation.nrrd")))
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "block_label.nrrd")))
    first = metrics["cases"][0]["labels"]["Lung tumor"]
    assert first["dice"] == pytest.approx(dice(segmentation == 1, label == 1), abs=1e-9)
    assert first["dice"] > 0.3
    assert first["hd95_mm"] > 0
    written = json.loads((tmp_path / "evaluation" / "metrics.json").read_text())
    assert written["summary"]["Lung tumor"]["dice_mean"] == pytest.approx(summary["dice_mean"])
    assert "Lung tumor" in (tmp_path / "evaluation" / "report.md").read_text()
    assert_png(tmp_path / "evaluation" / "dice_per_case.png")


# ---------------------------------------------------------------------------------------------------
# Folds, few-shot draws, labels and crops


def test_folds_keep_patients_together():
    labels = np.array([0, 1] * 8)
    groups = [f"patient{index // 4}" for index in range(16)]

    splits = stratified_folds(labels, groups, folds=2, seed=0)

    assert sorted(np.concatenate(splits).tolist()) == list(range(16))
    for held_out in splits:
        assert set(labels[held_out]) == {0, 1}
        held_groups = {groups[index] for index in held_out}
        others = {groups[index] for index in range(16) if index not in held_out}
        assert not held_groups & others


def test_folds_mix_patients_when_needed():
    labels = np.array([0, 0, 0, 1, 1, 1])
    groups = ["a", "a", "a", "b", "b", "b"]

    splits = stratified_folds(labels, groups, folds=2, seed=0)

    for held_out in splits:
        assert set(labels[held_out]) == {0, 1}


def test_folds_reject_small_classes():
    with pytest.raises(ValueError, match="--folds 3"):
        stratified_folds(np.array([0, 0, 0, 1, 1]), list("abcde"), folds=3, seed=0)


def test_few_shot_is_stratified_and_seeded():
    labels = np.array([0] * 20 + [1] * 8)
    indices = np.arange(28)

    chosen = few_shot(indices, labels, 0.25, seed=3)

    assert np.sum(labels[chosen] == 0) == 5
    assert np.sum(labels[chosen] == 1) == 2
    np.testing.assert_array_equal(chosen, few_shot(indices, labels, 0.25, seed=3))
    assert not np.array_equal(chosen, few_shot(indices, labels, 0.25, seed=4))


def test_labels_from_csv(ct_data: Path, tmp_path: Path):
    image = ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps({"training": [{"image": str(image), "id": name} for name in ("a", "b", "c")]}))
    table = tmp_path / "labels.csv"
    table.write_text("case_id,label\na,responder\nb,non-responder\nc,responder\n")

    cases, names = load_cases(datalist, labels_csv=table)

    assert names == {0: "non-responder", 1: "responder"}
    assert [case.label for case in cases] == [1, 0, 1]


def test_missing_csv_row_is_named(ct_data: Path, tmp_path: Path):
    image = ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"
    datalist = tmp_path / "cases.json"
    datalist.write_text(json.dumps({"training": [{"image": str(image), "id": "a"}, {"image": str(image), "id": "z"}]}))
    table = tmp_path / "labels.csv"
    table.write_text("a,1\n")

    with pytest.raises(ValueError, match="'z'"):
        load_cases(datalist, labels_csv=table)


def test_mask_crop_centres_on_lesion(ct_data: Path):
    folder = ct_data / "pyradiomics_lung_tumor"
    mask = sitk.ReadImage(str(folder / "lung2_label.nrrd"))
    voxels = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, ::-1].mean(axis=0)
    lps = mask.TransformContinuousIndexToPhysicalPoint(voxels.tolist())

    crop = classification_crop(folder / "lung2_image.nrrd", 2.0, (-1000.0, 1000.0), 64, "auto", mask=folder / "lung2_label.nrrd")

    assert crop.mode == "mask"
    assert crop.image.shape == (1, 64, 64, 64)
    # On the 2 mm grid the centre of mass moves by at most one voxel.
    np.testing.assert_allclose(crop.center_ras_mm, [-lps[0], -lps[1], lps[2]], atol=2.0)


def test_point_outside_scan_is_rejected(ct_data: Path):
    image = ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"

    with pytest.raises(ValueError, match="outside the scan"):
        classification_crop(image, 2.0, (-1000.0, 1000.0), 64, "point", point_ras=[0.0, 0.0, 5000.0])


def test_point_text_must_have_three_values():
    assert parse_point("1.5, -2, 3") == [1.5, -2.0, 3.0]
    with pytest.raises(ValueError, match="RAS"):
        parse_point("1,2")


def test_segmentation_finetune_validates(ct_data: Path, tmp_path: Path):
    from dagman_train.finetune import finetune_segmentation

    datalist = write_tumor_block(ct_data, tmp_path)
    content = json.loads(datalist.read_text())
    content["validation"] = list(content["training"])
    datalist.write_text(json.dumps(content))
    pretrain(load_config("tiny_cpu"), datalist, tmp_path / "pretrain", max_steps=1, show_progress=False)

    summary = finetune_segmentation(tmp_path / "pretrain", datalist, tmp_path / "finetune", max_steps=2, show_progress=False, validate_every=1)

    run = tmp_path / "finetune"
    written = json.loads((run / "validation.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert summary["validation"]["cases"] == 1
    assert 0.0 <= written["cases"][0]["labels"]["Lung tumor"]["dice"] <= 1.0
    assert written["summary"]["Lung tumor"]["lesions_by_size"]["large"]["lesions"] == 1
    # One check after step index 0 (every step, the last excluded) and the final one after step index 1.
    assert [record["step"] for record in records if "validation_dice_Lung tumor" in record] == [0, 1]
    assert json.loads((run / "finetune.json").read_text())["validation"]["summary"] == written["summary"]
    assert_png(run / "validation_dice.png")


def test_point_with_segmentation_model_fails(tiny_model_bundle: Path, ct_data: Path, tmp_path: Path, capsys):
    image = ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"

    code = dagman(["infer", "--model", str(tiny_model_bundle), "--input", str(image), "--output", str(tmp_path),
                   "--point", "0,150,-650", "--device", "cpu", "--progress", "none"])

    assert code == 1
    assert "is a segmentation model" in capsys.readouterr().err
    assert not (tmp_path / "result.json").exists()


def test_out_of_memory_retries_smaller(tiny_model_bundle: Path, ct_data: Path, monkeypatch, caplog):
    from dagman_core.inference import pipeline

    model, description = load_bundle(tiny_model_bundle)
    image = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"))[150:300, 280:430, 20:40]
    expected, _ = pipeline.segment_image(model, description["preprocessing"], image, torch.device("cpu"), window_batch=1)
    real_predict = pipeline.predict_volume
    batches = []

    def predict_or_run_out(model, volume, roi_size, overlap, window_batch, progress, blend):
        batches.append(window_batch)
        if window_batch > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_predict(model, volume, roi_size, overlap, window_batch, progress, blend=blend)

    monkeypatch.setattr(pipeline, "predict_volume", predict_or_run_out)
    messages = []

    segmentation, _ = pipeline.segment_image(
        model, description["preprocessing"], image, torch.device("cpu"), window_batch=4,
        progress=lambda stage, fraction, message: messages.append(message),
    )

    assert batches == [4, 1]
    assert "retrying with 1 on cpu" in caplog.text
    assert any("out of memory" in message for message in messages)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(segmentation), sitk.GetArrayFromImage(expected))


def test_cpu_allocation_failure_is_out_of_memory():
    from dagman_core.inference.pipeline import is_out_of_memory

    try:
        torch.empty(1 << 60, dtype=torch.uint8)
    except RuntimeError as error:
        cpu_error = error
    else:
        pytest.fail("allocating 1 EiB succeeded")

    assert is_out_of_memory(cpu_error)
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("size mismatch for encoder.weight"))


def test_other_errors_are_not_retried(tiny_model_bundle: Path, ct_data: Path, monkeypatch):
    from dagman_core.inference import pipeline

    model, description = load_bundle(tiny_model_bundle)
    image = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"))[150:300, 280:430, 20:40]
    batches = []

    def fail(model, volume, roi_size, overlap, window_batch, progress, blend):
        batches.append(window_batch)
        raise RuntimeError("Expected all tensors to be on the same device")

    monkeypatch.setattr(pipeline, "predict_volume", fail)

    with pytest.raises(RuntimeError, match="same device"):
        pipeline.segment_image(model, description["preprocessing"], image, torch.device("cpu"), window_batch=4)
    assert batches == [4]
