"""Tests of ``dagman diagnose``: attention distance and entropy per head, on hand cases and a real run."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_tumor_block
from dagman_core.config import load_config
from dagman_core.models.encoder import DAGMaNEncoder
from dagman_train.diagnose import (
    HISTOGRAM_BINS,
    attention_entropy,
    diagnose_run,
    histogram_entropy,
    mean_attention_distance,
    pairwise_distances_mm,
    register,
    valid_window_queries,
    window_positions_mm,
)
from dagman_train.runs import atomic_save_safetensors, write_config

TINY_VIT = ["model.vit_width=48", "model.vit_depth=2", "model.vit_heads=4", "data.crop_size=64"]


@pytest.fixture(scope="module")
def two_case_datalist(ct_data: Path, tmp_path_factory) -> Path:
    """A datalist naming lung2's tumor block twice (as two cases with distinct ids)."""
    folder = tmp_path_factory.mktemp("diagnose data")
    write_tumor_block(ct_data, folder)
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "block_image.nrrd"}, {"image": "./block_image.nrrd"}]}))
    return datalist


def _assert_png(path: Path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.shape[0] > 300
    assert pixels.shape[1] > 600
    assert pixels.std() > 10.0


def _assert_stage_bounds(stage: dict) -> None:
    for name in ("mean_distance_mm", "entropy_nats"):
        assert len(stage[name]) == stage["num_heads"]
    for block in stage["blocks"]:
        assert len(block["mean_distance_mm"]) == stage["num_heads"]
        for distance in block["mean_distance_mm"]:
            assert math.isfinite(distance)
            assert 0.0 < distance <= stage["max_distance_mm"] + 1e-6
        for entropy in block["entropy_nats"]:
            assert 0.0 <= entropy <= math.log(stage["keys"]) + 1e-5
    histogram = stage["histogram"]
    assert len(histogram["edges_mm"]) == HISTOGRAM_BINS + 1
    assert sum(histogram["counts"]) == stage["num_heads"] * len(stage["blocks"])
    assert 0.0 <= histogram["entropy_nats"] <= math.log(HISTOGRAM_BINS) + 1e-9


def test_self_attention_is_zero():
    distances = pairwise_distances_mm((2, 2, 2), 3.0)
    attention = torch.eye(8).expand(5, 2, 8, 8)

    assert mean_attention_distance(attention, distances).tolist() == [0.0, 0.0]
    assert attention_entropy(attention).tolist() == [0.0, 0.0]


def test_uniform_window_distance():
    # In a 2 x 2 x 2 window at 2 mm each token has 1 key at 0 mm, 3 at 2 mm, 3 at 2 sqrt 2 mm and 1 at 2 sqrt 3 mm.
    distances = pairwise_distances_mm((2, 2, 2), 2.0)
    attention = torch.full((3, 4, 8, 8), 1.0 / 8.0)
    expected = (3 * 2.0 + 3 * 2.0 * math.sqrt(2.0) + 2.0 * math.sqrt(3.0)) / 8.0

    assert mean_attention_distance(attention, distances) == pytest.approx([expected] * 4, abs=1e-5)
    assert attention_entropy(attention) == pytest.approx([math.log(8.0)] * 4, abs=1e-5)


def test_padding_queries_left_out():
    # A 6^3 grid in 4^3 windows pads to 8^3: 8 windows of 64 tokens, 216 of them real per batch item.
    for shift in ((0, 0, 0), (2, 2, 2)):
        mask = valid_window_queries((6, 6, 6), (4, 4, 4), shift, batch=2)
        assert mask.shape == (16, 64)
        assert int(mask.sum()) == 2 * 216
    assert valid_window_queries((8, 8, 8), (4, 4, 4), (2, 2, 2), batch=1) is None

    # Padding queries that attend far away must not move the mean.
    distances = pairwise_distances_mm((2, 1, 1), 1.0)
    attention = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    assert mean_attention_distance(attention, distances, torch.tensor([[True, False]])).tolist() == [0.0]


def test_shifted_window_true_positions():
    # Rolling an 8-token axis back by 2 puts original tokens 6, 7, 0 and 1 into the second window.
    positions = window_positions_mm((8, 4, 4), (4, 4, 4), (2, 0, 0), 3.0)
    assert positions.shape == (2, 64, 3)
    assert positions[1, [0, 16, 32, 48], 0].tolist() == [18.0, 21.0, 0.0, 3.0]
    assert positions[0, [0, 16, 32, 48], 0].tolist() == [6.0, 9.0, 12.0, 15.0]


def test_histogram_entropy_bins():
    edges = np.linspace(0.0, 10.0, 11)
    assert histogram_entropy([1.5, 1.6, 1.7], edges) == ([0, 3, 0, 0, 0, 0, 0, 0, 0, 0], 0.0)
    counts, entropy = histogram_entropy([0.5, 9.5, 12.0], edges)
    assert counts[0] == 1
    assert counts[-1] == 2
    assert entropy == pytest.approx(-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3))


def test_diagnose_tiny_pretraining_run(two_case_datalist: Path, tmp_path: Path):
    from dagman_train.pretrain import pretrain

    run_dir = tmp_path / "pretrain"
    pretrain(load_config("tiny_cpu"), two_case_datalist, run_dir, max_steps=2, device="cpu", show_progress=False)
    report = diagnose_run(run_dir, two_case_datalist, tmp_path / "diagnose", cases=4, progress=False)

    written = json.loads((tmp_path / "diagnose" / "head_diversity.json").read_text())
    assert written == report
    assert report["config"] == "tiny_cpu"
    assert report["cases_used"] == 2
    assert [case["id"] for case in report["cases"]] == ["block_image", "block_image_2"]
    assert [stage["name"] for stage in report["stages"]] == ["stage 0", "stage 1", "stage 2", "stage 3", "SA"]
    assert [stage["num_heads"] for stage in report["stages"]] == [1, 2, 4, 8, 4]
    assert [stage["token_spacing_mm"] for stage in report["stages"]] == [4.0, 8.0, 16.0, 32.0, 32.0]
    for stage in report["stages"]:
        _assert_stage_bounds(stage)
    # tiny_cpu's stage 2 has two blocks, the second with shifted windows.
    assert [block["shifted"] for block in report["stages"][2]["blocks"]] == [False, True]

    _assert_png(tmp_path / "diagnose" / "head_diversity.png")
    for case in report["cases"]:
        _assert_png(tmp_path / "diagnose" / f"attention_{case['id']}.png")
    assert not list((tmp_path / "diagnose").glob(".*"))


def test_vit_as_one_stage(two_case_datalist: Path, tmp_path: Path, capsys):
    config = load_config("dagman_vit", overrides=TINY_VIT)
    run_dir = tmp_path / "vit run"
    write_config(run_dir, config)
    atomic_save_safetensors(DAGMaNEncoder(config, drop_path=0.0).state_dict(), run_dir / "encoder.safetensors")

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    arguments = parser.parse_args(["diagnose", "--run", str(run_dir), "--datalist", str(two_case_datalist), "--output", str(tmp_path / "out"), "--cases", "1"])
    assert arguments.handler(arguments) == 0
    assert "head_diversity.json" in capsys.readouterr().out

    report = json.loads((tmp_path / "out" / "head_diversity.json").read_text())
    assert report["cases_used"] == 1
    (stage,) = report["stages"]
    assert (stage["name"], stage["num_heads"], stage["keys"], len(stage["blocks"])) == ("ViT", 4, 65, 2)
    _assert_stage_bounds(stage)


def test_command_defaults():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    arguments = parser.parse_args(["diagnose", "--run", "r", "--datalist", "d.json", "--output", "o"])
    assert (arguments.cases, arguments.device) == (4, "cpu")
    with pytest.raises(SystemExit):
        parser.parse_args(["diagnose", "--run", "r", "--output", "o"])


def test_missing_encoder_names_pretrain(tmp_path: Path):
    write_config(tmp_path, load_config("tiny_cpu"))
    with pytest.raises(FileNotFoundError, match="run 'dagman pretrain' first"):
        diagnose_run(tmp_path, tmp_path / "datalist.json", tmp_path / "out", progress=False)
