"""Torch probe, NVIDIA GPU detection, device names and first-use package installation.

The probe and nvidia-smi run as real child processes: the venv's Python, a fake torch
package put first on PYTHONPATH, and a fake nvidia-smi shell script put first on PATH.
pip runs for real with ``--dry-run --no-index``, so nothing is installed or downloaded.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import types

import pytest

import slicer_fixtures  # noqa: F401 (puts the module folders on sys.path)

from DAGMaNLib.command import build_inference_command, validate_device  # noqa: E402
from DAGMaNLib.environment import (  # noqa: E402
    GIB,
    MIB,
    CudaDevice,
    GpuInfo,
    TorchProbe,
    describe_environment,
    detect_nvidia_gpus,
    device_choices,
    parse_nvidia_smi_csv,
    parse_probe_output,
    probe_torch,
)
from DAGMaNLib.installation import (  # noqa: E402
    CONSTRAINTS_FILE_NAME,
    constraints_text,
    install_requirements,
    pip_arguments,
    restart_needed,
    write_constraints_file,
)

POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="the fake executables are POSIX shell scripts")

H200_CSV = "0, NVIDIA H200, 143771, 143000\n"


@pytest.fixture(scope="module")
def venv_probe() -> TorchProbe:
    """The probe of this venv's Python: torch 2.13 CPU build and monai."""
    return probe_torch(sys.executable)


def write_executable(folder, name, script):
    """Write a POSIX shell script ``folder/name`` and make it executable."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


# Torch probe


def test_probe_venv_cpu_build(venv_probe):
    assert venv_probe.probe_error is None
    assert venv_probe.import_error is None
    assert venv_probe.failed_imports == {}
    assert venv_probe.torch_version == importlib.metadata.version("torch")
    assert venv_probe.torch_version.startswith("2.13.")
    assert venv_probe.cuda_version is None
    assert venv_probe.cpu_build
    assert not venv_probe.cuda_available
    assert venv_probe.devices == ()
    assert venv_probe.ready
    assert device_choices(venv_probe) == ["auto", "cpu"]


def test_describe_cpu_build_without_gpu(venv_probe):
    report = describe_environment(venv_probe, [])

    assert report.lines == (f"PyTorch {venv_probe.torch_version}, CPU build",)
    assert report.warning == ""


def test_probe_broken_torch_import(tmp_path):
    fake_packages = tmp_path / "fake_packages"
    (fake_packages / "torch").mkdir(parents=True)
    (fake_packages / "torch" / "__init__.py").write_text('raise ImportError("broken build")\n')
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake_packages), os.environ.get("PYTHONPATH", "")])}

    probe = probe_torch(sys.executable, environment=environment)

    assert probe.probe_error is None
    assert probe.import_error == "ImportError: broken build"
    assert probe.failed_imports["torch"] == "ImportError: broken build"
    assert "monai" in probe.failed_imports
    assert probe.torch_version is None
    assert not probe.ready
    assert device_choices(probe) == ["auto", "cpu"]

    report = describe_environment(probe, [])
    assert "PyTorch cannot be imported (ImportError: broken build)" in report.warning
    assert "Install PyTorch" in report.warning
    assert report.lines == ("PyTorch cannot be imported: ImportError: broken build",)


def test_probe_missing_module_reported():
    probe = probe_torch(sys.executable, required_imports=("torch", "no_such_module_dagman"))

    assert probe.torch_importable
    assert probe.import_error is None
    assert probe.failed_imports == {"no_such_module_dagman": "ModuleNotFoundError: No module named 'no_such_module_dagman'"}
    assert not probe.ready

    report = describe_environment(probe, [])
    assert "Cannot import: no_such_module_dagman" in report.lines
    assert "no_such_module_dagman cannot be imported" in report.warning


def test_probe_missing_interpreter(tmp_path):
    probe = probe_torch(str(tmp_path / "no-python"), environment=dict(os.environ))

    assert "cannot start Python interpreter" in probe.probe_error
    assert not probe.ready
    assert describe_environment(probe, []).warning.startswith("PyTorch could not be checked")


@POSIX_ONLY
def test_probe_timeout(tmp_path):
    slow_python = write_executable(tmp_path, "python", "exec sleep 30\n")

    probe = probe_torch(str(slow_python), environment=dict(os.environ), timeout_s=0.5)

    assert "timed out after 0.5 s" in probe.probe_error
    assert not probe.ready


@POSIX_ONLY
def test_probe_crash_without_json(tmp_path):
    crashing_python = write_executable(
        tmp_path, "python", "echo 'loading...'\necho 'Fatal Python error: Segmentation fault' >&2\nexit 139\n"
    )

    probe = probe_torch(str(crashing_python), environment=dict(os.environ))

    assert "exited with status 139 without printing its result" in probe.probe_error
    assert "Fatal Python error: Segmentation fault" in probe.probe_error
    assert probe.import_error == "Fatal Python error: Segmentation fault"
    assert not probe.ready


def test_probe_output_with_cuda_devices():
    # The JSON line that the probe script prints on a CUDA machine, after a line of other output.
    report = {
        "dagman_torch_probe": 1,
        "failed_imports": {},
        "torch_version": "2.13.0+cu128",
        "cuda_version": "12.8",
        "cuda_available": True,
        "devices": [
            {"index": 0, "name": "NVIDIA H200", "free_bytes": int(120.3 * GIB), "total_bytes": int(139.7 * GIB)},
            {"index": 1, "name": "NVIDIA H200", "free_bytes": None, "total_bytes": int(139.7 * GIB), "error": "busy"},
        ],
    }
    probe = parse_probe_output("python", 0, "a warning\n" + json.dumps(report) + "\n", "")

    assert probe.ready
    assert probe.devices[1] == CudaDevice(1, "NVIDIA H200", int(139.7 * GIB), None, "busy")
    assert device_choices(probe) == ["auto", "cpu", "cuda:0", "cuda:1"]
    assert describe_environment(probe, parse_nvidia_smi_csv(H200_CSV)) == describe_environment(probe, [])

    described = describe_environment(probe, [])
    assert described.lines == (
        "PyTorch 2.13.0+cu128, CUDA 12.8",
        "cuda:0 NVIDIA H200: 120.3 of 139.7 GiB free",
        "cuda:1 NVIDIA H200: 139.7 GiB, free memory unknown",
    )
    assert described.warning == ""


def test_probe_output_invalid_json():
    probe = parse_probe_output("python", 0, '{"dagman_torch_probe": 1, "failed_imports": {}}\n', "")

    assert "printed an invalid result (KeyError: 'torch_version')" in probe.probe_error
    assert not probe.ready


# nvidia-smi


@POSIX_ONLY
def test_fake_nvidia_smi_parsed(tmp_path, monkeypatch, venv_probe):
    arguments_file = tmp_path / "arguments.txt"
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir, "nvidia-smi", f"printf '%s\\n' \"$@\" > '{arguments_file}'\nprintf '{H200_CSV}'\n")
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), os.environ["PATH"]]))

    gpus = detect_nvidia_gpus()

    assert gpus == [GpuInfo(0, "NVIDIA H200", 143771 * MIB, 143000 * MIB)]
    assert arguments_file.read_text().split() == [
        "--query-gpu=index,name,memory.total,memory.free",
        "--format=csv,noheader,nounits",
    ]

    report = describe_environment(venv_probe, gpus)
    assert "nvidia-smi reports an NVIDIA GPU (NVIDIA H200)" in report.warning
    assert f"PyTorch {venv_probe.torch_version} is a CPU build" in report.warning
    assert "Uninstall PyTorch" in report.warning
    assert "Install PyTorch" in report.warning
    assert "nvidia-smi GPU 0 NVIDIA H200: 139.6 of 140.4 GiB free" in report.lines


def test_no_nvidia_smi_on_path(tmp_path, monkeypatch, venv_probe):
    empty_bin = tmp_path / "empty_bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))

    gpus = detect_nvidia_gpus()

    assert gpus == []
    assert describe_environment(venv_probe, gpus).warning == ""


@POSIX_ONLY
def test_failing_nvidia_smi_logged(tmp_path, monkeypatch, caplog):
    bin_dir = tmp_path / "bin"
    write_executable(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed because it could not reach the driver' >&2\nexit 9\n")
    monkeypatch.setenv("PATH", str(bin_dir))

    with caplog.at_level(logging.WARNING, logger="DAGMaNLib.environment"):
        gpus = detect_nvidia_gpus()

    assert gpus == []
    assert "nvidia-smi exited with status 9: NVIDIA-SMI has failed" in caplog.text


@POSIX_ONLY
def test_nvidia_smi_runner_timeout(tmp_path, monkeypatch):
    write_executable(tmp_path, "nvidia-smi", "exit 0\n")
    monkeypatch.setenv("PATH", str(tmp_path))

    def timing_out_runner(command, **options):
        raise subprocess.TimeoutExpired(command, options["timeout"])

    assert detect_nvidia_gpus(runner=timing_out_runner) == []


def test_nvidia_smi_csv_edge_cases():
    text = "0, NVIDIA H200, 143771, 143000\n\n1, Tesla, Inc. GPU, [N/A], [N/A]\nnot a gpu line\nx, name, 1, 1\n"

    assert parse_nvidia_smi_csv(text) == [
        GpuInfo(0, "NVIDIA H200", 143771 * MIB, 143000 * MIB),
        GpuInfo(1, "Tesla, Inc. GPU", None, None),
    ]


def test_cuda_build_without_device_warns():
    probe = TorchProbe("python", torch_version="2.13.0+cu130", cuda_version="13.0", cuda_available=False)

    report = describe_environment(probe, parse_nvidia_smi_csv(H200_CSV))

    assert report.lines[0] == "PyTorch 2.13.0+cu130, CUDA 13.0, no CUDA device available"
    assert "sees no CUDA device" in report.warning
    assert "update the driver" in report.warning
    assert device_choices(probe) == ["auto", "cpu"]


# Device names


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12"])
def test_validate_device_valid(device):
    assert validate_device(device) == device


@pytest.mark.parametrize("device", ["cuda:x", "gpu", "cuda:-1", "cuda:", "cuda:01", "CUDA", " cuda", "cuda:0 ", "mps", ""])
def test_validate_device_invalid(device):
    with pytest.raises(ValueError, match=f"device {device!r} is invalid; valid forms: 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        validate_device(device)


def test_inference_command_passes_cuda_index(tmp_path):
    command = build_inference_command("py", tmp_path / "model", tmp_path / "in.nrrd", tmp_path / "out", "cuda:1")

    assert command[command.index("--device") + 1] == "cuda:1"
    with pytest.raises(ValueError, match="device 'cuda:x' is invalid"):
        build_inference_command("py", tmp_path, tmp_path, tmp_path, "cuda:x")


# Constraints file and pip


def test_constraints_pin_slicer_packages():
    lines = constraints_text().splitlines()

    assert lines[0].startswith("# ")
    for name in ("numpy", "SimpleITK", "vtk", "torch"):
        assert f"{name}=={importlib.metadata.version(name)}" in lines


def test_constraints_skip_absent_package():
    lines = constraints_text(("numpy", "no-such-distribution-dagman")).splitlines()

    assert f"numpy=={importlib.metadata.version('numpy')}" in lines
    assert "# no-such-distribution-dagman: no installed distribution found, not pinned" in lines
    assert not any(line.startswith("no-such-distribution-dagman==") for line in lines)


def test_write_constraints_file_replaces(tmp_path):
    folder = tmp_path / "settings" / "DAGMaN"

    first = write_constraints_file(folder, packages=("numpy",))
    second = write_constraints_file(folder)

    assert first == second == folder / CONSTRAINTS_FILE_NAME
    assert second.read_text(encoding="utf-8") == constraints_text()
    assert sorted(path.name for path in folder.iterdir()) == [CONSTRAINTS_FILE_NAME]


def run_pip_dry_run(tmp_path, constraints_path, requirement):
    """Run ``pip install --dry-run`` offline: no index, an empty wheel folder, no pip configuration."""
    empty_wheels = tmp_path / "no_wheels"
    empty_wheels.mkdir(exist_ok=True)
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PIP_")}
    environment.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    command = [
        sys.executable, "-m", "pip", "install", "--dry-run", "--no-index",
        "--find-links", str(empty_wheels), "-c", str(constraints_path), requirement,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=120, check=False)


def test_pip_rejects_other_numpy(tmp_path):
    installed = importlib.metadata.version("numpy")
    other = "1.26.4" if installed != "1.26.4" else "1.26.3"
    constraints_path = write_constraints_file(tmp_path / "constraints")

    completed = run_pip_dry_run(tmp_path, constraints_path, f"numpy=={other}")

    output = completed.stdout + completed.stderr
    assert completed.returncode != 0, output
    assert f"The user requested (constraint) numpy=={installed}" in output


def test_pip_accepts_pinned_numpy(tmp_path):
    installed = importlib.metadata.version("numpy")
    constraints_path = write_constraints_file(tmp_path / "constraints")

    completed = run_pip_dry_run(tmp_path, constraints_path, f"numpy=={installed}")

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Requirement already satisfied: numpy" in completed.stdout


def test_pip_arguments_end_with_constraints(tmp_path):
    path = tmp_path / "folder with space" / CONSTRAINTS_FILE_NAME

    assert pip_arguments(["monai==1.6.1", "einops>=0.7"], path) == ["monai==1.6.1", "einops>=0.7", "-c", str(path)]
    with pytest.raises(TypeError, match="not the string 'monai'"):
        pip_arguments("monai", path)
    with pytest.raises(ValueError, match="requirement '--upgrade' is invalid"):
        pip_arguments(["--upgrade", "monai"], path)
    with pytest.raises(ValueError, match="requirements is empty"):
        pip_arguments([], path)


# Installation through Slicer's pip functions


def fake_slicer_module(packaging_signature="constraints"):
    """Return a fake ``slicer`` module and the list that its pip functions append their calls to.

    It replaces the module of Slicer's GUI application, which cannot run in these tests.
    ``packaging_signature`` picks ``slicer.packaging.pip_install``: "constraints" has the
    parameters of Slicer 5.11 and later, "no-constraints" lacks a constraints parameter, and
    None leaves ``slicer.packaging`` out, as in Slicer 5.10 and earlier.
    """
    calls = []
    module = types.ModuleType("dagman_fake_slicer")

    def util_pip_install(requirements):
        calls.append(("slicer.util.pip_install", requirements, {}))

    module.util = types.SimpleNamespace(pip_install=util_pip_install)

    if packaging_signature == "constraints":

        def packaging_pip_install(requirements, constraints=None, blocking=True, show_progress=True, requester=None):
            calls.append(("slicer.packaging.pip_install", requirements, {"constraints": constraints, "requester": requester}))

        module.packaging = types.SimpleNamespace(pip_install=packaging_pip_install)
    elif packaging_signature == "no-constraints":

        def packaging_pip_install(args=None, *, requirements=None, interactive=True):
            calls.append(("slicer.packaging.pip_install", args, {}))

        module.packaging = types.SimpleNamespace(pip_install=packaging_pip_install)
    return module, calls


def test_install_with_slicer_packaging(tmp_path):
    module, calls = fake_slicer_module("constraints")
    requirements = ["numpy>=1", "einops>=0.7"]

    outcome = install_requirements(requirements, module, tmp_path / "constraints")

    constraints_path = tmp_path / "constraints" / CONSTRAINTS_FILE_NAME
    assert calls == [
        ("slicer.packaging.pip_install", requirements, {"constraints": str(constraints_path), "requester": "DAGMaN"})
    ]
    assert outcome.installer == "slicer.packaging.pip_install"
    assert outcome.installed == ("numpy>=1", "einops>=0.7")
    assert outcome.constraints_path == constraints_path
    assert constraints_path.read_text(encoding="utf-8") == constraints_text()
    assert outcome.restart_needed


@pytest.mark.parametrize("packaging_signature", [None, "no-constraints"])
def test_install_with_slicer_util(tmp_path, packaging_signature):
    module, calls = fake_slicer_module(packaging_signature)

    outcome = install_requirements(["einops>=0.7"], module, tmp_path)

    constraints_path = tmp_path / CONSTRAINTS_FILE_NAME
    assert calls == [("slicer.util.pip_install", ["einops>=0.7", "-c", str(constraints_path)], {})]
    assert type(calls[0][1]) is list
    assert outcome.installer == "slicer.util.pip_install"
    assert constraints_path.is_file()
    assert outcome.restart_needed == restart_needed(["einops>=0.7"])


def string_only_slicer_module():
    """Return a fake ``slicer`` module whose ``util.pip_install`` splits a string with ``str.split()``, as older releases do."""
    calls = []
    module = types.ModuleType("dagman_fake_old_slicer")

    def util_pip_install(requirements):
        calls.append(["install", *requirements.split()])

    module.util = types.SimpleNamespace(pip_install=util_pip_install)
    return module, calls


def test_install_with_string_only_util(tmp_path):
    module, calls = string_only_slicer_module()
    folder = tmp_path / "constraints"

    outcome = install_requirements(["einops>=0.7"], module, folder)

    assert calls == [["install", "einops>=0.7", "-c", str(folder / CONSTRAINTS_FILE_NAME)]]
    assert outcome.installer == "slicer.util.pip_install"


def test_install_string_only_rejects_spaces(tmp_path):
    module, calls = string_only_slicer_module()

    with pytest.raises(RuntimeError, match="choose a constraints folder whose path has no spaces"):
        install_requirements(["einops>=0.7"], module, tmp_path / "folder with space")
    assert calls == []


def test_install_nothing_to_install(tmp_path):
    module, calls = fake_slicer_module("constraints")

    outcome = install_requirements([], module, tmp_path / "constraints")

    assert calls == []
    assert outcome.installer is None
    assert not outcome.restart_needed
    assert not (tmp_path / "constraints").exists()


def test_install_without_pip_function(tmp_path):
    with pytest.raises(RuntimeError, match="PythonSlicer -m pip install einops>=0.7 -c "):
        install_requirements(["einops>=0.7"], types.ModuleType("dagman_bare_slicer"), tmp_path)


def test_restart_needed_for_imported():
    assert "numpy" in sys.modules
    assert restart_needed(["numpy>=1"])
    assert restart_needed(["monai==1.6.1", "numpy>=1"])
    assert restart_needed(["pyyaml>=6.0"], loaded_modules={"yaml": object()})
    assert restart_needed(["Some_Package>=1"], loaded_modules={"some_package": object()})


def test_restart_not_needed_for_unimported():
    assert not restart_needed(["pyyaml>=6.0"], loaded_modules={"numpy": object()})
    assert not restart_needed(["no-such-distribution-dagman>=1"])
    assert not restart_needed([])
