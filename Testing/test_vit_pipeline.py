"""The ViT variant end to end through the command line: pretrain, fine-tune, export and infer on real CT."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_tumor_block
from dagman_core.data.io import same_geometry

pytestmark = pytest.mark.slow

TINY_VIT = [
    "model.vit_width=48", "model.vit_depth=4", "model.vit_heads=4", "data.crop_size=64", "finetune.crop_size=64",
    "loss.out_dim=256", "loss.head_hidden_dim=64", "loss.head_bottleneck_dim=32", "train.batch_size=1",
]


def dagman(*arguments: str) -> subprocess.CompletedProcess:
    process = subprocess.run([sys.executable, "-m", "dagman_train.cli", *arguments], capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, f"dagman {' '.join(arguments)} failed:\n{process.stdout}\n{process.stderr}"
    return process


def test_vit_attention_through_infer(ct_data: Path, tmp_path: Path):
    datalist = write_tumor_block(ct_data, tmp_path)

    settings = [argument for override in TINY_VIT for argument in ("--set", override)]
    dagman("pretrain", "--config", "dagman_vit", *settings, "--datalist", str(datalist), "--output", str(tmp_path / "pretrain"), "--max-steps", "2")
    metrics = [json.loads(line) for line in (tmp_path / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2
    assert all(np.isfinite(record["loss"]) for record in metrics)

    dagman("finetune", "--pretrained", str(tmp_path / "pretrain"), "--datalist", str(datalist), "--output", str(tmp_path / "finetune"), "--max-steps", "2")
    dagman("export", "--run", str(tmp_path / "finetune"), "--output", str(tmp_path / "model"))
    description = json.loads((tmp_path / "model" / "model.json").read_text())
    assert description["architecture"]["type"] == "dagman_vit_unetr"

    source = tmp_path / "block_image.nrrd"
    dagman("infer", "--model", str(tmp_path / "model"), "--input", str(source), "--output", str(tmp_path / "out"), "--progress", "none")
    reference = sitk.ReadImage(str(source))
    attention = sitk.ReadImage(str(tmp_path / "out" / "attention.nrrd"))
    assert same_geometry(attention, reference, tolerance=1e-6)
    values = sitk.GetArrayFromImage(attention)
    assert values.min() >= 0.0
    assert values.max() == pytest.approx(1.0, abs=1e-3)
    assert values.std() > 0.0
