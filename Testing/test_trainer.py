"""The pretraining trainer at cluster scale, on CPU: torchrun with gloo, exact resume, signals, bad volumes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from conftest import LUNG2_TUMOR_BLOCK

pytestmark = pytest.mark.slow

# tiny_cpu with one volume per process and step, no stochastic depth (it draws from each process's own
# generator) and no loader workers, so that runs are exactly repeatable on CPU.
SETTINGS = ["model.drop_path=0", "data.num_workers=0", "train.checkpoint_every_steps=1", "train.keep_last_checkpoints=20"]


def dagman_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "dagman_train.cli", *arguments]


def run_dagman(*arguments: str) -> subprocess.CompletedProcess:
    process = subprocess.run(dagman_command(*arguments), capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, f"dagman {' '.join(arguments)} failed:\n{process.stdout}\n{process.stderr}"
    return process


def settings(*extra: str) -> list[str]:
    return [argument for override in (*SETTINGS, *extra) for argument in ("--set", override)]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_blocks(ct_data: Path, tmp_path_factory) -> Path:
    """A datalist of two real CT blocks: lung2 around its tumor and the same rows of lung1."""
    folder = tmp_path_factory.mktemp("blocks")
    for case in ("lung1", "lung2"):
        image = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / f"{case}_image.nrrd"))
        size = image.GetSize()
        block = tuple(slice(min(part.start, extent - 30), min(part.stop, extent)) for part, extent in zip(LUNG2_TUMOR_BLOCK, size))
        sitk.WriteImage(image[block], str(folder / f"{case}.nrrd"))
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({"training": [{"image": "lung1.nrrd"}, {"image": "lung2.nrrd"}]}))
    return datalist


def test_torchrun_matches_one_process(two_blocks: Path, tmp_path: Path):
    one = tmp_path / "one"
    run_dagman("pretrain", "--config", "tiny_cpu", *settings("train.batch_size=2"), "--datalist", str(two_blocks),
               "--output", str(one), "--max-steps", "3")

    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dagman_train.cli",
               "pretrain", "--config", "tiny_cpu", *settings("train.batch_size=1"), "--datalist", str(two_blocks),
               "--output", str(two), "--max-steps", "3"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, f"torchrun failed:\n{process.stdout}\n{process.stderr}"

    # Both ranks end with the same student weights and centers.
    digests = json.loads((two / "summary.json").read_text())["rank_state_sha256"]
    assert len(digests) == 2
    assert digests[0] == digests[1]

    # The same global batch gives the same losses. The tolerance covers the order of floating-point
    # sums, which differs between one batch of 2 and two all-reduced batches of 1.
    for single, split in zip(read_metrics(one), read_metrics(two), strict=True):
        assert split["loss"] == pytest.approx(single["loss"], rel=1e-4)
        for term in ("amip", "ampd", "aitd", "gitd"):
            assert split[term] == pytest.approx(single[term], rel=1e-4)

    weights_one = torch.load(one / "checkpoints" / "checkpoint-00000003.pt", weights_only=False)
    weights_two = torch.load(two / "checkpoints" / "checkpoint-00000003.pt", weights_only=False)
    for name, value in weights_one["centers"].items():
        torch.testing.assert_close(weights_two["centers"][name], value, rtol=1e-4, atol=1e-5)


def test_resume_after_kill_repeats_losses(two_blocks: Path, tmp_path: Path):
    whole = tmp_path / "whole"
    run_dagman("pretrain", "--config", "tiny_cpu", *settings(), "--datalist", str(two_blocks), "--output", str(whole), "--max-steps", "7")

    # Kill the run with SIGKILL as soon as step 3 is in metrics.jsonl.
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        dagman_command("pretrain", "--config", "tiny_cpu", *settings(), "--datalist", str(two_blocks), "--output", str(killed), "--max-steps", "7"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["step"] == 3 for line in metrics.read_text().splitlines() if line.strip()):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL

    # Every checkpoint left behind is complete, however the kill fell.
    checkpoints = sorted((killed / "checkpoints").glob("checkpoint-*.pt"))
    assert checkpoints
    for path in checkpoints:
        assert torch.load(path, weights_only=False)["step"] == int(path.stem.split("-")[1])

    run_dagman("pretrain", "--resume", "--datalist", str(two_blocks), "--output", str(killed))

    expected = {record["step"]: record for record in read_metrics(whole)}
    resumed = {record["step"]: record for record in read_metrics(killed)}
    assert sorted(resumed) == list(range(7))
    for step in (4, 5, 6):
        for key in ("loss", "amip", "ampd", "aitd", "gitd", "masked_fraction", "lr"):
            assert resumed[step][key] == expected[step][key], (step, key)


@pytest.mark.parametrize(
    "stop_signal, workers, whole_group",
    [(signal.SIGTERM, 0, False), (signal.SIGUSR1, 0, False), (signal.SIGTERM, 2, True)],
    ids=["SIGTERM", "SIGUSR1", "SIGTERM to the group with loader workers"],
)
def test_stop_signal_saves_checkpoint(stop_signal, workers: int, whole_group: bool, two_blocks: Path, tmp_path: Path):
    run = tmp_path / "run"
    # torchrun and SLURM signal the whole process group, loader workers included.
    process = subprocess.Popen(
        dagman_command("pretrain", "--config", "tiny_cpu", *settings("train.checkpoint_every_steps=1000", f"data.num_workers={workers}"),
                       "--datalist", str(two_blocks), "--output", str(run), "--max-steps", "200"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=whole_group,
    )
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and not (run / "metrics.jsonl").exists():
        time.sleep(0.05)
    while time.monotonic() < deadline and len((run / "metrics.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.05)
    if whole_group:
        os.killpg(process.pid, stop_signal)
    else:
        process.send_signal(stop_signal)
    stdout, stderr = process.communicate(timeout=300)

    assert process.returncode == 0, stderr
    assert "continue with --resume" in stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped"] == stop_signal.name
    checkpoints = sorted((run / "checkpoints").glob("checkpoint-*.pt"))
    assert len(checkpoints) == 1
    state = torch.load(checkpoints[0], weights_only=False)
    assert state["step"] == summary["steps"] == len(read_metrics(run))
    assert {"student", "teacher", "centers", "optimizer", "random_states", "epoch", "total_steps"} <= set(state)
    assert not [path.name for path in (run / "checkpoints").iterdir() if path.name.startswith(".")]


def test_corrupt_volume_is_skipped_and_reported(two_blocks: Path, tmp_path: Path, caplog):
    from dagman_core.config import load_config
    from dagman_train.pretrain import pretrain

    folder = two_blocks.parent
    corrupt = tmp_path / "corrupt.nrrd"
    header = (folder / "lung1.nrrd").read_bytes()[:200]
    corrupt.write_bytes(header + b"not a volume")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": [
        {"image": str(folder / "lung1.nrrd")}, {"image": str(corrupt)}, {"image": str(folder / "lung2.nrrd")},
    ]}))

    config = load_config("tiny_cpu", overrides=SETTINGS)
    with caplog.at_level("WARNING"):
        summary = pretrain(config, datalist, tmp_path / "run", max_steps=3, show_progress=False)

    warnings = [record for record in caplog.records if str(corrupt) in record.getMessage()]
    assert len(warnings) == 1
    assert summary["steps"] == 3
    assert summary["volumes"] == 2
    assert [entry["image"] for entry in summary["skipped_volumes"]] == [str(corrupt)]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_volumes"][0]["image"] == str(corrupt)


def test_cache_is_reused_across_runs(two_blocks: Path, tmp_path: Path):
    from dagman_core.config import load_config
    from dagman_train.pretrain import pretrain

    cache = tmp_path / "shared cache"
    config = load_config("tiny_cpu", overrides=[*SETTINGS, f"data.cache_dir={cache}"])
    pretrain(config, two_blocks, tmp_path / "first", max_steps=1, show_progress=False)
    cached = sorted(path.name for path in cache.rglob("*.pt"))

    pretrain(config, two_blocks, tmp_path / "second", max_steps=1, show_progress=False)

    assert len(cached) == 2
    assert sorted(path.name for path in cache.rglob("*.pt")) == cached
    assert not (tmp_path / "second" / "cache").exists()
    shutil.rmtree(cache)


def test_torchrun_finetune_writes_one_model(ct_data: Path, tmp_path: Path):
    from conftest import write_tumor_block

    datalist = write_tumor_block(ct_data, tmp_path)
    run_dagman("pretrain", "--config", "tiny_cpu", *settings(), "--datalist", str(datalist), "--output", str(tmp_path / "pretrain"), "--max-steps", "1")

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "dagman_train.cli",
               "finetune", "--pretrained", str(tmp_path / "pretrain"), "--datalist", str(datalist),
               "--output", str(tmp_path / "finetune"), "--max-steps", "2"]
    process = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode == 0, f"torchrun finetune failed:\n{process.stdout}\n{process.stderr}"

    info = json.loads((tmp_path / "finetune" / "finetune.json").read_text())
    assert info["steps"] == 2
    assert len((tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()) == 2
    assert (tmp_path / "finetune" / "segmenter.safetensors").stat().st_size > 0


def test_retention_keeps_last_and_every_nth(tmp_path: Path):
    from dagman_train.checkpoints import list_checkpoints, save_checkpoint

    for step in range(1, 13):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=3, keep_every=5)

    assert [step for step, _ in list_checkpoints(tmp_path)] == [5, 10, 11, 12]


def test_unreadable_newest_checkpoint_falls_back(tmp_path: Path):
    from dagman_train.checkpoints import checkpoint_path, load_latest_checkpoint, save_checkpoint

    for step in (1, 2):
        save_checkpoint(tmp_path, step, {"step": step}, keep_last=5, keep_every=100)
    checkpoint_path(tmp_path, 2).write_bytes(b"cut short")

    state, path = load_latest_checkpoint(tmp_path)

    assert state["step"] == 1
    assert path == checkpoint_path(tmp_path, 1)


def test_tensorboard_receives_step_scalars(two_blocks: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dagman_core.config import load_config
    from dagman_train.pretrain import pretrain

    pretrain(load_config("tiny_cpu", overrides=SETTINGS), two_blocks, tmp_path / "run", max_steps=2, show_progress=False)

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in ("loss", "amip", "ampd", "aitd", "gitd", "lr", "weight_decay", "ema_momentum", "teacher_entropy",
                 "teacher_kl_uniform", "masked_fraction", "volumes_per_second"):
        assert f"pretrain/{name}" in tags
    assert [event.step for event in events.Scalars("pretrain/loss")] == [0, 1]


def test_new_run_refuses_used_folder(two_blocks: Path, tmp_path: Path):
    from dagman_core.config import load_config
    from dagman_train.pretrain import pretrain

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0}\n')

    with pytest.raises(ValueError, match="continue it with --resume"):
        pretrain(load_config("tiny_cpu", overrides=SETTINGS), two_blocks, run, max_steps=1, show_progress=False)
    assert (run / "metrics.jsonl").read_text() == '{"step": 0, "loss": 1.0}\n'
