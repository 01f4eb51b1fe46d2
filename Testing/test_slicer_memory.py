"""The peak-memory estimate of DAGMaNLib.memory: its arithmetic, its checks, and one real inference run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import slicer_fixtures  # noqa: F401 (puts the module folders on sys.path)

from DAGMaNLib import memory  # noqa: E402
from DAGMaNLib.memory import (  # noqa: E402
    GIB,
    SAFETY_MARGIN,
    MemoryEstimate,
    available_memory,
    estimate_peak_memory,
    format_gib,
    memory_warning,
    model_weight_bytes,
)
from dagman_core.config import load_config  # noqa: E402

LUNG2_SHAPE, LUNG2_SPACING = (512, 512, 61), (0.6269531, 0.6269531, 5.0)
ABDOMEN_SHAPE, ABDOMEN_SPACING = (122, 101, 112), (3.0, 3.0, 3.0)


def describe_model(preset: str = "tiny_cpu", task: str = "segmentation", num_classes: int = 2) -> dict:
    """Return a model.json as ``dagman_core.bundle.write_bundle`` writes it, without building the network."""
    config = load_config(preset)
    if task == "classification":
        architecture = {"type": "dagman_classifier", "num_classes": num_classes, "config": config.to_dict(), "pooling": "cls"}
        crop = config.data.crop_size
        preprocessing = {"spacing_mm": [config.data.spacing_mm] * 3, "crop_size": [crop] * 3, "crop_mode": "auto"}
    else:
        kind = "dagman_vit_unetr" if config.model.backbone == "vit" else "dagman_swin_unetr"
        architecture = {"type": kind, "num_classes": num_classes, "config": config.to_dict()}
        crop = config.finetune.crop_size
        preprocessing = {"spacing_mm": [config.data.spacing_mm] * 3, "crop_size": [crop] * 3, "sliding_window_overlap": 0.5}
    preprocessing.update({"orientation": "RAS", "hu_window": list(config.data.hu_window)})
    return {"format_version": 1, "name": preset, "task": task, "architecture": architecture, "preprocessing": preprocessing}


# ---------------------------------------------------------------------------------------------
# Arithmetic


@pytest.mark.parametrize("task", ["segmentation", "classification"])
def test_estimate_grows_with_volume_size(task):
    description = describe_model(task=task)
    small = estimate_peak_memory(description, LUNG2_SHAPE, LUNG2_SPACING, "cpu")
    longer = estimate_peak_memory(description, (512, 512, 122), LUNG2_SPACING, "cpu")
    # The same voxels over a larger field of view make a larger network grid.
    wider = estimate_peak_memory(description, LUNG2_SHAPE, (0.9, 0.9, 5.0), "cpu")

    assert longer.host_bytes > small.host_bytes
    assert wider.host_bytes > small.host_bytes
    assert small.host_bytes > memory.PROCESS_BASELINE_BYTES


def test_estimate_grows_with_window_batch():
    description = describe_model()
    single = estimate_peak_memory(description, ABDOMEN_SHAPE, ABDOMEN_SPACING, "cpu", window_batch=1)
    batched = estimate_peak_memory(description, ABDOMEN_SHAPE, ABDOMEN_SPACING, "cpu", window_batch=4)

    assert batched.host_stage == "sliding windows"
    assert batched.host_bytes > single.host_bytes
    assert batched.breakdown["window activations (4 per pass)"] > single.breakdown["window activations (1 per pass)"]


def test_window_batch_capped_by_windows():
    description = describe_model()
    single = estimate_peak_memory(description, (60, 60, 20), (1.0, 1.0, 2.0), "cpu", window_batch=1)
    many = estimate_peak_memory(description, (60, 60, 20), (1.0, 1.0, 2.0), "cpu", window_batch=1000)

    assert many.host_bytes == single.host_bytes
    assert "window activations (1 per pass)" in many.breakdown


def test_estimate_grows_with_model_size():
    tiny = estimate_peak_memory(describe_model("tiny_cpu"), ABDOMEN_SHAPE, ABDOMEN_SPACING, "cpu")
    paper = estimate_peak_memory(describe_model("paper_swin"), ABDOMEN_SHAPE, ABDOMEN_SPACING, "cpu")

    assert paper.host_bytes > tiny.host_bytes
    assert paper.breakdown["model weights"] > 10 * tiny.breakdown["model weights"]


def test_breakdown_sums_to_peak():
    for device in ("cpu", "cuda:1"):
        estimate = estimate_peak_memory(describe_model(), LUNG2_SHAPE, LUNG2_SPACING, device)
        assert sum(estimate.host_breakdown.values()) == estimate.host_bytes
        assert sum(estimate.gpu_breakdown.values()) == estimate.gpu_bytes
        assert sum(estimate.breakdown.values()) == estimate.total_bytes


def test_cuda_split_puts_activations_on_gpu():
    description = describe_model()
    cpu = estimate_peak_memory(description, ABDOMEN_SHAPE, ABDOMEN_SPACING, "cpu")
    cuda = estimate_peak_memory(description, ABDOMEN_SHAPE, ABDOMEN_SPACING, "cuda")

    assert cpu.gpu_bytes == 0
    assert "window activations (1 per pass)" in cpu.host_breakdown
    assert "window activations (1 per pass)" in cuda.gpu_breakdown
    assert "window activations (1 per pass)" not in cuda.host_breakdown
    assert "sliding-window output (2 classes, float32)" in cuda.gpu_breakdown
    assert "model weights" in cuda.gpu_breakdown
    assert "CUDA runtime" in cuda.host_breakdown
    assert "input volume" in cuda.host_breakdown
    assert "RAM input volume" in cuda.breakdown
    assert "GPU window activations (1 per pass)" in cuda.breakdown
    assert cuda.device_bytes == cuda.gpu_bytes
    assert cpu.device_bytes == cpu.host_bytes


def test_cuda_split_classification():
    estimate = estimate_peak_memory(describe_model(task="classification"), LUNG2_SHAPE, LUNG2_SPACING, "cuda:0")
    message = memory_warning(estimate, estimate.gpu_bytes // 2)

    assert "encoder activations" in estimate.gpu_breakdown
    assert "encoder activations" not in estimate.host_breakdown
    assert estimate.gpu_stage == "classifying the crop"
    assert estimate.task == "classification"
    assert "out-of-memory error" in message
    assert "one window per pass" not in message


def test_describe_one_line():
    estimate = MemoryEstimate(device="cpu", host_bytes=int(2.1 * GIB), gpu_bytes=0)
    cuda = MemoryEstimate(device="cuda:0", host_bytes=int(1.5 * GIB), gpu_bytes=int(3.25 * GIB))

    assert estimate.describe() == "about 2.1 GiB on cpu"
    assert estimate.describe(14 * GIB) == "about 2.1 GiB on cpu; 14 GiB available"
    assert cuda.describe(int(7.5 * GIB)) == "about 3.2 GiB of GPU memory on cuda:0 and 1.5 GiB of RAM; 7.5 GiB available"
    assert format_gib(0) == "0.1 GiB"


# ---------------------------------------------------------------------------------------------
# Warning


def test_memory_warning_around_available():
    estimate = estimate_peak_memory(describe_model(), LUNG2_SHAPE, LUNG2_SPACING, "cpu")
    needed = estimate.device_bytes

    assert memory_warning(estimate, int(needed * SAFETY_MARGIN) + 1) == ""
    assert memory_warning(estimate, None) == ""

    tight = memory_warning(estimate, needed + 1)
    assert "may not fit" in tight
    short = memory_warning(estimate, needed // 2)
    assert "will probably not fit" in short
    assert format_gib(needed) in short
    assert format_gib(needed // 2) in short
    assert "Close other programs" in short


def test_memory_warning_cuda_names_fallback():
    estimate = estimate_peak_memory(describe_model(), ABDOMEN_SHAPE, ABDOMEN_SPACING, "cuda")
    message = memory_warning(estimate, estimate.gpu_bytes // 2)

    assert "GPU memory on cuda" in message
    assert "one window per pass" in message
    assert "on the CPU" in message
    assert memory_warning(estimate, 100 * GIB) == ""
    ram = memory_warning(estimate, 100 * GIB, available_host_bytes=estimate.host_bytes // 2)
    assert "of RAM" in ram
    assert memory_warning(estimate, 100 * GIB, available_host_bytes=100 * GIB) == ""


# ---------------------------------------------------------------------------------------------
# Checks of the inputs


@pytest.mark.parametrize(
    "shape, spacing, device, expected",
    [
        ((512, 0, 61), LUNG2_SPACING, "cpu", r"volume shape \(512, 0, 61\)"),
        ((512, 512), LUNG2_SPACING, "cpu", r"volume shape \(512, 512\)"),
        ((512, 512, 61.5), LUNG2_SPACING, "cpu", r"volume shape"),
        (LUNG2_SHAPE, (0.6, -1.0, 5.0), "cpu", r"voxel spacing \(0.6, -1.0, 5.0\)"),
        (LUNG2_SHAPE, (0.6, float("nan"), 5.0), "cpu", r"voxel spacing"),
        (LUNG2_SHAPE, LUNG2_SPACING, "gpu", r"device 'gpu'"),
        (LUNG2_SHAPE, LUNG2_SPACING, "auto", r"device 'auto'"),
        (LUNG2_SHAPE, LUNG2_SPACING, "cuda:01", r"device 'cuda:01'"),
    ],
)
def test_invalid_geometry_or_device_raises(shape, spacing, device, expected):
    with pytest.raises(ValueError, match=expected):
        estimate_peak_memory(describe_model(), shape, spacing, device)


def test_unknown_task_raises():
    description = describe_model()
    description["task"] = "detection"
    with pytest.raises(ValueError, match="unknown task 'detection'"):
        estimate_peak_memory(description, LUNG2_SHAPE, LUNG2_SPACING, "cpu")


def test_invalid_model_json_raises():
    wrong_architecture = describe_model()
    wrong_architecture["architecture"]["type"] = "dagman_classifier"
    with pytest.raises(ValueError, match="unknown architecture 'dagman_classifier' for task 'segmentation'"):
        estimate_peak_memory(wrong_architecture, LUNG2_SHAPE, LUNG2_SPACING, "cpu")

    no_config = describe_model()
    del no_config["architecture"]["config"]
    with pytest.raises(ValueError, match="'config' is missing"):
        estimate_peak_memory(no_config, LUNG2_SHAPE, LUNG2_SPACING, "cpu")

    flat_crop = describe_model()
    flat_crop["preprocessing"]["crop_size"] = [64, 64, 32]
    with pytest.raises(ValueError, match=r"crop_size is \[64, 64, 32\]"):
        estimate_peak_memory(flat_crop, LUNG2_SHAPE, LUNG2_SPACING, "cpu")


@pytest.mark.parametrize(
    "keyword, value, expected",
    [("window_batch", 0, "invalid window batch 0"), ("input_bytes_per_voxel", 0, "invalid input_bytes_per_voxel 0"),
     ("weights_bytes", -1, "invalid weights_bytes -1")],
)
def test_invalid_keyword_raises(keyword, value, expected):
    with pytest.raises(ValueError, match=expected):
        estimate_peak_memory(describe_model(), LUNG2_SHAPE, LUNG2_SPACING, "cpu", **{keyword: value})


# ---------------------------------------------------------------------------------------------
# Available memory


def test_available_memory_cpu_and_cuda():
    host = available_memory("cpu")

    assert isinstance(host, int)
    assert host > 0
    assert available_memory("cuda", free_gpu_bytes=5 * GIB) == 5 * GIB
    assert available_memory("cuda:1") is None
    with pytest.raises(ValueError, match="device 'tpu'"):
        available_memory("tpu")


def test_available_memory_without_psutil(monkeypatch):
    monkeypatch.setitem(sys.modules, "psutil", None)  # makes "import psutil" raise ImportError
    host = available_memory("cpu")

    with open("/proc/meminfo", encoding="ascii") as stream:
        listed = [line for line in stream if line.startswith("MemAvailable:")]
    assert listed
    assert isinstance(host, int)
    assert host > 0


def test_meminfo_available_missing_file(tmp_path):
    assert memory._meminfo_available(str(tmp_path / "missing")) is None
    (tmp_path / "meminfo").write_text("MemTotal: 100 kB\nMemAvailable:     2048 kB\n", encoding="ascii")
    assert memory._meminfo_available(str(tmp_path / "meminfo")) == 2048 * 1024


# ---------------------------------------------------------------------------------------------
# Weights counted from model.json


@pytest.mark.parametrize(
    "preset, task",
    [("tiny_cpu", "segmentation"), ("tiny_cpu", "classification"), ("paper_swin", "segmentation"),
     ("dagman_vit", "segmentation"), ("dagman_vit", "classification")],
)
def test_weight_bytes_match_state_dict(preset, task):
    from dagman_core.models.classification import DAGMaNClassifier
    from dagman_core.models.segmentation import build_segmenter

    config = load_config(preset)
    model = DAGMaNClassifier(config, 3) if task == "classification" else build_segmenter(config, 3)
    state_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())

    assert model_weight_bytes(describe_model(preset, task, num_classes=3)) == state_bytes


def test_weight_bytes_match_bundle_file(tiny_model_bundle):
    from dagman_core.bundle import read_model_json

    description = read_model_json(tiny_model_bundle)
    file_bytes = (tiny_model_bundle / "model.safetensors").stat().st_size
    counted = model_weight_bytes(description)

    assert counted <= file_bytes
    assert file_bytes - counted < 64 * 1024  # the safetensors JSON header


# ---------------------------------------------------------------------------------------------
# One real run of the inference child

# Starts the command after the log path and prints its exit code and peak RSS (KiB) as JSON. Linux
# carries a process's peak RSS across fork and exec, so the child is started from this small
# interpreter instead of from pytest, whose own RSS would otherwise be the floor of the measurement.
WRAPPER = """
import json, os, subprocess, sys
with open(sys.argv[1], "w", encoding="utf-8") as log:
    process = subprocess.Popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(process.pid, 0)
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


def test_real_child_peak_near_estimate(ct_data, tiny_model_bundle, tmp_path):
    from dagman_core.bundle import read_model_json

    ct_path = ct_data / "pyradiomics_lung_tumor" / "lung2_image.nrrd"
    estimate = estimate_peak_memory(read_model_json(tiny_model_bundle), LUNG2_SHAPE, LUNG2_SPACING, "cpu")
    command = [
        sys.executable, "-m", "dagman_core.inference", "--model", str(tiny_model_bundle), "--input", str(ct_path),
        "--output", str(tmp_path / "output"), "--device", "cpu", "--progress", "none",
    ]
    wrapper = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(tmp_path / "child.log"), *command],
        cwd=slicer_fixtures.DAGMAN_MODULE_DIR, capture_output=True, text=True, timeout=300,
    )
    assert wrapper.returncode == 0, wrapper.stderr
    result = json.loads(wrapper.stdout.strip().splitlines()[-1])
    log = (tmp_path / "child.log").read_text(encoding="utf-8")
    assert result["returncode"] == 0, log[-4000:]

    measured = result["maxrss_kib"] * 1024
    ratio = measured / estimate.host_bytes
    assert 0.5 <= ratio <= 2.0, f"measured {measured / GIB:.2f} GiB, estimate {estimate.describe()} ({estimate.host_stage})"
    assert (tmp_path / "output" / "segmentation.nrrd").exists()
