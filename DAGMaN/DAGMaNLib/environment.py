"""Torch version, CUDA devices and NVIDIA GPUs, as the inference child process finds them.

Slicer's own process never imports torch, so ``probe_torch`` starts the child's Python
interpreter with a short script that imports torch and monai and prints one JSON line.
``detect_nvidia_gpus`` runs ``nvidia-smi`` independently of torch, so a CPU build of torch
on a machine with an NVIDIA GPU can be recognized and reported.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from .command import build_child_environment

logger = logging.getLogger(__name__)

# The modules that the inference process cannot run without. torch comes first because
# the device information needs it.
REQUIRED_IMPORTS = ("torch", "monai")

GIB = 2**30
MIB = 2**20

# The key that marks the probe's JSON line among anything else that the imports print.
PROBE_KEY = "dagman_torch_probe"

# Run as ``python -c PROBE_SCRIPT torch monai``. A broken torch build can raise OSError or
# RuntimeError on import as well as ImportError, so the script catches every Exception.
# NOTE: the tests run this script only with CPU builds of torch; the CUDA branch is covered
# by parser tests of its JSON alone.
PROBE_SCRIPT = r"""
import json
import sys

report = {"dagman_torch_probe": 1, "failed_imports": {}}
for name in sys.argv[1:]:
    try:
        __import__(name)
    except Exception as error:
        report["failed_imports"][name] = f"{type(error).__name__}: {error}"

if "torch" not in report["failed_imports"]:
    import torch

    report["torch_version"] = torch.__version__
    report["cuda_version"] = torch.version.cuda
    report["cuda_available"] = torch.cuda.is_available()
    devices = []
    if report["cuda_available"]:
        for index in range(torch.cuda.device_count()):
            device = {"index": index, "name": torch.cuda.get_device_name(index)}
            try:
                device["free_bytes"], device["total_bytes"] = torch.cuda.mem_get_info(index)
            except RuntimeError as error:
                device["total_bytes"] = torch.cuda.get_device_properties(index).total_memory
                device["free_bytes"] = None
                device["error"] = f"{type(error).__name__}: {error}"
            devices.append(device)
    report["devices"] = devices

print(json.dumps(report), flush=True)
"""

NVIDIA_SMI_QUERY = (
    "--query-gpu=index,name,memory.total,memory.free",
    "--format=csv,noheader,nounits",
)
NVIDIA_SMI_TIMEOUT_S = 30.0

# Steps in the PyTorch Utils module of Slicer's PyTorch extension (SlicerPyTorch). Its
# Computation backend setting has no effect while torch is installed, so a reinstall
# starts with Uninstall PyTorch.
PYTORCH_INSTALL_STEPS = (
    "in the PyTorch Utils module of Slicer's PyTorch extension, set Computation backend "
    "(automatic picks the newest CUDA backend that the NVIDIA driver supports, or cpu) and click Install PyTorch"
)
PYTORCH_REINSTALL_STEPS = (
    "reinstall PyTorch with a CUDA build: in the PyTorch Utils module of Slicer's PyTorch extension, "
    "click Uninstall PyTorch and restart Slicer, then set Computation backend to a CUDA backend that the "
    "NVIDIA driver supports (for example cu128, or automatic) and click Install PyTorch"
)


@dataclass(frozen=True)
class CudaDevice:
    """A CUDA device as torch in the child process reports it, with memory in bytes."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int | None  # None when torch.cuda.mem_get_info failed, for example on a busy GPU
    error: str | None = None


@dataclass(frozen=True)
class GpuInfo:
    """An NVIDIA GPU as ``nvidia-smi`` lists it, with memory in bytes (``None`` where it printed ``[N/A]``).

    ``index`` is nvidia-smi's numbering, which differs from torch's device index when
    ``CUDA_VISIBLE_DEVICES`` hides or reorders GPUs.
    """

    index: int
    name: str
    total_bytes: int | None
    free_bytes: int | None


@dataclass(frozen=True)
class TorchProbe:
    """The result of ``probe_torch``: torch's version and CUDA devices, or why they are unknown."""

    python_executable: str
    torch_version: str | None = None
    cuda_version: str | None = None  # torch.version.cuda, which is None for a CPU build
    cuda_available: bool = False
    devices: tuple[CudaDevice, ...] = ()
    # Import name -> "ExceptionType: message" for every required import that failed.
    failed_imports: Mapping[str, str] = field(default_factory=dict)
    # Why torch could not be imported, as the last line of a traceback reads, e.g.
    # "ModuleNotFoundError: No module named 'torch'".
    import_error: str | None = None
    # Why the probe itself failed: timeout, missing interpreter, crash or no JSON line.
    probe_error: str | None = None

    @property
    def torch_importable(self) -> bool:
        """Whether torch was imported in the child process."""
        return self.torch_version is not None

    @property
    def cpu_build(self) -> bool:
        """Whether torch was imported and is a build without CUDA."""
        return self.torch_importable and self.cuda_version is None

    @property
    def ready(self) -> bool:
        """Whether every required import succeeded, so inference can start."""
        return self.probe_error is None and self.torch_importable and not self.failed_imports


@dataclass(frozen=True)
class EnvironmentReport:
    """Lines that describe torch and the GPUs for the module panel, and a warning (empty when none)."""

    lines: tuple[str, ...]
    warning: str


def probe_torch(
    python_executable: str,
    environment: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
    required_imports: Sequence[str] = REQUIRED_IMPORTS,
) -> TorchProbe:
    """Import ``required_imports`` in a child ``python_executable`` and return what torch reports.

    ``environment`` defaults to ``build_child_environment()``, the environment that the
    inference process gets. ``timeout_s`` (seconds) bounds the whole child run. Importing
    torch with CUDA and querying each device's free memory starts a CUDA context per device,
    which takes a few seconds and some hundred MB of GPU memory until the child exits.
    A missing interpreter, a timeout, a crash and failed imports do not raise. They are
    stored in the returned probe's ``probe_error``, ``import_error`` and ``failed_imports``.
    """
    if environment is None:
        environment = build_child_environment()
    command = [python_executable, "-c", PROBE_SCRIPT, *required_imports]

    try:
        completed = subprocess.run(
            command,
            env=dict(environment),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        message = (
            f"importing {', '.join(required_imports)} in {python_executable} timed out after {timeout_s:g} s; "
            "check that the interpreter starts, or raise timeout_s on a slow file system"
        )
        logger.error("Torch probe failed: %s", message)
        return TorchProbe(python_executable, probe_error=message)
    except OSError as error:
        message = f"cannot start Python interpreter {python_executable!r}: {error}"
        logger.error("Torch probe failed: %s", message)
        return TorchProbe(python_executable, probe_error=message)

    return parse_probe_output(python_executable, completed.returncode, completed.stdout, completed.stderr)


def parse_probe_output(python_executable: str, returncode: int, stdout: str, stderr: str) -> TorchProbe:
    """Build a ``TorchProbe`` from the probe child's exit status and output."""
    report = _find_probe_line(stdout)
    if report is None:
        last_error_line = _last_line(stderr)
        message = (
            f"the torch probe in {python_executable} exited with status {returncode} without printing its result"
            + (f"; last error line: {last_error_line}" if last_error_line else "")
        )
        logger.error("Torch probe failed: %s", message)
        return TorchProbe(python_executable, import_error=last_error_line, probe_error=message)

    failed_imports = {str(name): str(error) for name, error in report.get("failed_imports", {}).items()}
    for name, error in failed_imports.items():
        logger.warning("import %s failed in %s: %s", name, python_executable, error)
    if "torch" in failed_imports:
        return TorchProbe(python_executable, failed_imports=failed_imports, import_error=failed_imports["torch"])

    try:
        devices = tuple(
            CudaDevice(
                index=int(device["index"]),
                name=str(device["name"]),
                total_bytes=int(device["total_bytes"]),
                free_bytes=None if device.get("free_bytes") is None else int(device["free_bytes"]),
                error=device.get("error"),
            )
            for device in report.get("devices", [])
        )
        torch_version = str(report["torch_version"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        message = f"the torch probe in {python_executable} printed an invalid result ({type(error).__name__}: {error})"
        logger.error("Torch probe failed: %s", message)
        return TorchProbe(python_executable, failed_imports=failed_imports, probe_error=message)

    return TorchProbe(
        python_executable,
        torch_version=torch_version,
        cuda_version=report.get("cuda_version"),
        cuda_available=bool(report.get("cuda_available")),
        devices=devices,
        failed_imports=failed_imports,
    )


def _find_probe_line(stdout: str) -> dict | None:
    """Return the last stdout line that is the probe's JSON object, or ``None``."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and PROBE_KEY in value:
            return value
    return None


def _last_line(text: str) -> str | None:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else None


def detect_nvidia_gpus(runner: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> list[GpuInfo]:
    """Return the NVIDIA GPUs that ``nvidia-smi`` reports, or ``[]`` when it is not on PATH or fails.

    ``runner`` has the signature of ``subprocess.run``. Failures are logged, not raised,
    because a missing or broken nvidia-smi only means that no GPU can be reported.
    """
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        logger.info("nvidia-smi is not on PATH; no NVIDIA GPU reported")
        return []

    command = [nvidia_smi, *NVIDIA_SMI_QUERY]
    try:
        completed = runner(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=NVIDIA_SMI_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        logger.warning("nvidia-smi failed to run (%s): %s", nvidia_smi, error)
        return []
    if completed.returncode != 0:
        logger.warning(
            "nvidia-smi exited with status %d: %s", completed.returncode, _last_line(completed.stderr or "") or "no output"
        )
        return []

    return parse_nvidia_smi_csv(completed.stdout)


def parse_nvidia_smi_csv(text: str) -> list[GpuInfo]:
    """Parse ``index, name, memory.total, memory.free`` lines (MiB, no header); malformed lines are logged and skipped."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        # The GPU name may itself contain commas, so the fields are taken from both ends.
        fields = [value.strip() for value in line.split(",")]
        if len(fields) < 4:
            logger.warning("Skipping nvidia-smi line with fewer than 4 fields: %r", line)
            continue
        try:
            index = int(fields[0])
        except ValueError:
            logger.warning("Skipping nvidia-smi line with a non-integer GPU index: %r", line)
            continue
        name = ", ".join(fields[1:-2])
        gpus.append(GpuInfo(index, name, _mib_to_bytes(fields[-2]), _mib_to_bytes(fields[-1])))
    return gpus


def _mib_to_bytes(value: str) -> int | None:
    """Convert an nvidia-smi memory value in MiB to bytes, or return ``None`` for ``[N/A]`` and other non-numbers."""
    try:
        return round(float(value) * MIB)
    except ValueError:
        return None


def device_choices(probe: TorchProbe) -> list[str]:
    """Return the ``--device`` values to offer: ``auto``, ``cpu``, then ``cuda:N`` for each CUDA device that torch reports."""
    choices = ["auto", "cpu"]
    if probe.cuda_available:
        choices.extend(f"cuda:{device.index}" for device in probe.devices)
    return choices


def describe_environment(probe: TorchProbe, gpus: Sequence[GpuInfo]) -> EnvironmentReport:
    """Describe torch, its CUDA devices and the NVIDIA GPUs, and warn when inference cannot use them.

    The warning is non-empty when torch or another required module cannot be imported,
    when nvidia-smi reports a GPU but torch is a CPU build, and when a CUDA build of torch
    finds no device although nvidia-smi reports one.
    """
    lines: list[str] = []
    warnings: list[str] = []

    if probe.probe_error is not None:
        lines.append("PyTorch could not be checked")
        warnings.append(f"PyTorch could not be checked: {probe.probe_error}.")
    elif not probe.torch_importable:
        lines.append(f"PyTorch cannot be imported: {probe.import_error}")
        warnings.append(
            f"PyTorch cannot be imported ({probe.import_error}), so inference cannot run. "
            f"To install it, {PYTORCH_INSTALL_STEPS}."
        )
    else:
        lines.append(_torch_line(probe))
        lines.extend(_cuda_device_line(device) for device in probe.devices)
        missing = {name: error for name, error in probe.failed_imports.items() if name != "torch"}
        if missing:
            names = ", ".join(sorted(missing))
            lines.append(f"Cannot import: {names}")
            details = "; ".join(f"{name}: {error}" for name, error in sorted(missing.items()))
            warnings.append(f"{names} cannot be imported ({details}); install the missing Python packages.")

    if not probe.devices:
        lines.extend(_nvidia_gpu_line(gpu) for gpu in gpus)

    if gpus and probe.cpu_build:
        warnings.append(
            f"nvidia-smi reports {_count_gpus(gpus)}, but PyTorch {probe.torch_version} is a CPU build, "
            f"so inference runs on the CPU. To use the GPU, {PYTORCH_REINSTALL_STEPS}."
        )
    elif gpus and probe.torch_importable and not probe.cuda_available:
        warnings.append(
            f"nvidia-smi reports {_count_gpus(gpus)}, but PyTorch {probe.torch_version} (CUDA {probe.cuda_version}) "
            "sees no CUDA device, so inference runs on the CPU. The NVIDIA driver may be older than this CUDA "
            "version needs: update the driver, or reinstall PyTorch with an older CUDA computation backend."
        )

    return EnvironmentReport(lines=tuple(lines), warning=" ".join(warnings))


def _torch_line(probe: TorchProbe) -> str:
    if probe.cpu_build:
        return f"PyTorch {probe.torch_version}, CPU build"
    if not probe.cuda_available:
        return f"PyTorch {probe.torch_version}, CUDA {probe.cuda_version}, no CUDA device available"
    return f"PyTorch {probe.torch_version}, CUDA {probe.cuda_version}"


def _cuda_device_line(device: CudaDevice) -> str:
    total = f"{device.total_bytes / GIB:.1f} GiB"
    if device.free_bytes is None:
        return f"cuda:{device.index} {device.name}: {total}, free memory unknown"
    return f"cuda:{device.index} {device.name}: {device.free_bytes / GIB:.1f} of {total} free"


def _nvidia_gpu_line(gpu: GpuInfo) -> str:
    if gpu.total_bytes is None or gpu.free_bytes is None:
        return f"nvidia-smi GPU {gpu.index} {gpu.name}: memory unknown"
    return f"nvidia-smi GPU {gpu.index} {gpu.name}: {gpu.free_bytes / GIB:.1f} of {gpu.total_bytes / GIB:.1f} GiB free"


def _count_gpus(gpus: Sequence[GpuInfo]) -> str:
    names = ", ".join(sorted({gpu.name for gpu in gpus}))
    noun = "an NVIDIA GPU" if len(gpus) == 1 else f"{len(gpus)} NVIDIA GPUs"
    return f"{noun} ({names})"
