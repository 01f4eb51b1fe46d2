"""The ``dagman`` command line end to end on real chest CT: datalist, pretrain, finetune, export, infer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
from safetensors.torch import load_file

from dagman_core.bundle import sha256_of
from dagman_core.data.io import same_geometry

pytestmark = pytest.mark.slow


def dagman(*arguments: str) -> subprocess.CompletedProcess:
    """Run the ``dagman`` command line in a child process and fail with its output when it fails."""
    process = subprocess.run([sys.executable, "-m", "dagman_train.cli", *arguments], capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, f"dagman {' '.join(arguments)} failed:\n{process.stdout}\n{process.stderr}"
    return process


@pytest.fixture(scope="module")
def lung_datalist(ct_data: Path, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("datalist")
    datalist = folder / "lungs.json"
    dagman("datalist", "--images", str(ct_data / "pyradiomics_lung_tumor"), "--labels", str(ct_data / "pyradiomics_lung_tumor"), "--output", str(datalist))
    return datalist


@pytest.fixture(scope="module")
def pretrain_run(lung_datalist: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "pretrain"
    dagman("pretrain", "--config", "tiny_cpu", "--datalist", str(lung_datalist), "--output", str(run), "--max-steps", "2")
    return run


@pytest.fixture(scope="module")
def model_bundle(pretrain_run: Path, lung_datalist: Path, tmp_path_factory) -> Path:
    runs = tmp_path_factory.mktemp("finetune")
    dagman("finetune", "--task", "segmentation", "--pretrained", str(pretrain_run), "--datalist", str(lung_datalist), "--output", str(runs / "run"), "--max-steps", "2")
    dagman("export", "--run", str(runs / "run"), "--output", str(runs / "model"))
    return runs / "model"


def test_datalist_pairs_images_and_labels(lung_datalist: Path):
    content = json.loads(lung_datalist.read_text())
    pairs = [(Path(entry["image"]).name, Path(entry["label"]).name) for entry in content["training"]]
    assert pairs == [("lung1_image.nrrd", "lung1_label.nrrd"), ("lung2_image.nrrd", "lung2_label.nrrd")]


def test_pretrain_writes_run_folder(pretrain_run: Path):
    lines = (pretrain_run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    for key in ("step", "loss", "amip", "ampd", "aitd", "gitd", "lr", "ema_momentum", "teacher_entropy"):
        assert key in first
    assert first["ema_momentum"] == pytest.approx(0.996)
    assert json.loads(lines[1])["ema_momentum"] == pytest.approx(1.0)
    assert (pretrain_run / "config.yaml").exists()
    encoder = load_file(str(pretrain_run / "encoder.safetensors"))
    assert any(key.startswith("backbone.swin.") for key in encoder)
    assert any(key.startswith("sa.") for key in encoder)


def test_export_bundle_describes_model(model_bundle: Path):
    description = json.loads((model_bundle / "model.json").read_text())

    assert description["task"] == "segmentation"
    assert description["weights"]["sha256"] == sha256_of(model_bundle / "model.safetensors")
    assert description["preprocessing"]["orientation"] == "RAS"
    assert description["preprocessing"]["spacing_mm"] == [2.0, 2.0, 2.0]
    assert description["preprocessing"]["hu_window"] == [-1000.0, 1000.0]
    assert description["preprocessing"]["crop_size"] == [64, 64, 64]
    assert description["labels"][0]["name"] == "Lung tumor"
    assert description["labels"][0]["terminology"]["type"]["code"] == "108369006"
    assert description["provenance"]["training_data"]["cases"] == 2
    assert "created" in description["provenance"]
    # No pickle anywhere in the bundle.
    assert sorted(path.name for path in model_bundle.iterdir()) == ["model.json", "model.safetensors"]


def test_infer_writes_outputs_on_input_geometry(model_bundle: Path, ct_data: Path, tmp_path: Path):
    source = ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"
    output = tmp_path / "out put é"
    process = dagman("infer", "--model", str(model_bundle), "--input", str(source), "--output", str(output), "--device", "cpu", "--progress", "json")

    progress = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    assert progress[-1]["stage"] == "done"
    assert all(0.0 <= line["fraction"] <= 1.0 for line in progress)
    assert {"load", "preprocess", "infer", "write"} <= {line["stage"] for line in progress}

    reference = sitk.ReadImage(str(source))
    segmentation = sitk.ReadImage(str(output / "segmentation.nrrd"))
    attention = sitk.ReadImage(str(output / "attention.nrrd"))
    assert same_geometry(segmentation, reference, tolerance=1e-6)
    assert same_geometry(attention, reference, tolerance=1e-6)
    assert segmentation.GetPixelID() == sitk.sitkUInt8
    assert attention.GetPixelID() == sitk.sitkFloat32

    values = sitk.GetArrayFromImage(attention)
    assert values.min() >= 0.0
    assert values.max() <= 1.0
    assert values.max() > 0.5

    result = json.loads((output / "result.json").read_text())
    assert result["task"] == "segmentation"
    assert result["model_sha256"] == sha256_of(model_bundle / "model.safetensors")
    assert result["device"] == "cpu"
    assert result["labels"][0]["value"] == 1
    assert result["timings_s"]["total"] > 0
    assert not [path.name for path in output.iterdir() if path.name.startswith(".")]


def test_infer_reads_dicom_series(tiny_model_bundle: Path, ct_data: Path, tmp_path: Path):
    series = ct_data / "dcmqi_abdomen_3slice" / "dicom"
    dagman("infer", "--model", str(tiny_model_bundle), "--input", str(series), "--output", str(tmp_path), "--progress", "none")

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series)))
    reference = reader.Execute()
    assert same_geometry(sitk.ReadImage(str(tmp_path / "segmentation.nrrd")), reference)
    assert same_geometry(sitk.ReadImage(str(tmp_path / "attention.nrrd")), reference)


def test_infer_missing_input_fails_with_message(tiny_model_bundle: Path, tmp_path: Path):
    process = subprocess.run(
        [sys.executable, "-m", "dagman_train.cli", "infer", "--model", str(tiny_model_bundle), "--input", str(tmp_path / "missing.nrrd"),
         "--output", str(tmp_path / "out"), "--progress", "json"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 1
    last = json.loads(process.stdout.strip().splitlines()[-1])
    assert last["stage"] == "error"
    assert "missing.nrrd" in last["message"]
    assert "missing.nrrd" in process.stderr


def test_infer_rejects_tampered_weights(tiny_model_bundle: Path, tmp_path: Path, ct_data: Path):
    tampered = tmp_path / "model"
    tampered.mkdir()
    (tampered / "model.json").write_bytes((tiny_model_bundle / "model.json").read_bytes())
    weights = bytearray((tiny_model_bundle / "model.safetensors").read_bytes())
    weights[-1] ^= 0xFF
    (tampered / "model.safetensors").write_bytes(bytes(weights))

    process = subprocess.run(
        [sys.executable, "-m", "dagman_core.inference", "--model", str(tampered), "--input", str(ct_data / "pyradiomics_lung_tumor" / "lung1_image.nrrd"),
         "--output", str(tmp_path / "out"), "--progress", "none"],
        capture_output=True, text=True, timeout=300,
    )
    assert process.returncode == 1
    assert "checksum mismatch" in process.stderr
    assert not (tmp_path / "out" / "segmentation.nrrd").exists()
