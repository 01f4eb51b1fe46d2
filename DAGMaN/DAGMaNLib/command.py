"""The inference command line and the environment that the child process runs in."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Mapping, Sequence

# The fixed device names. ``cuda:N`` (N a device index) is valid too; validate_device checks it.
DEVICES = ("auto", "cpu", "cuda")
CUDA_INDEX_PATTERN = re.compile(r"cuda:(0|[1-9][0-9]*)")
INFERENCE_MODULE = "dagman_core.inference"

# DAGMaN/ contains both DAGMaNLib/ and the dagman_core/ package, in the source tree and in the
# installed extension alike, so the child process can import dagman_core from there.
CORE_PARENT_DIR = Path(__file__).resolve().parent.parent


def running_in_slicer_application() -> bool:
    """Return whether this code runs inside the Slicer application (``slicer.app`` exists)."""
    slicer_module = sys.modules.get("slicer")
    return getattr(slicer_module, "app", None) is not None


def find_python_executable() -> str:
    """Return the Python interpreter for the child process.

    Inside Slicer this is ``PythonSlicer``, the launcher that starts Slicer's own Python with
    its libraries and with the PyTorch extension's torch. Elsewhere it is ``sys.executable``.
    """
    if not running_in_slicer_application():
        return sys.executable

    python_slicer = shutil.which("PythonSlicer")
    if python_slicer is None:
        raise FileNotFoundError(
            "PythonSlicer was not found on PATH, so the inference process cannot start; "
            "reinstall Slicer or pass python_executable to DAGMaNLogic"
        )
    return python_slicer


def validate_device(device: str) -> str:
    """Return ``device`` unchanged when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; raise ``ValueError`` otherwise.

    N is a CUDA device index as torch counts them (a non-negative integer without leading
    zeros or signs). Whether device N exists is checked by the inference process, which
    has torch.
    """
    if device in DEVICES or (isinstance(device, str) and CUDA_INDEX_PATTERN.fullmatch(device)):
        return device
    raise ValueError(
        f"device {device!r} is invalid; valid forms: 'auto', 'cpu', 'cuda' or 'cuda:N' "
        "with N a CUDA device index such as 'cuda:0'"
    )


def build_inference_command(
    python_executable: str,
    model_dir: Path,
    input_path: Path,
    output_dir: Path,
    device: str,
    point_ras: Sequence[float] | None = None,
    mask_path: Path | None = None,
) -> list[str]:
    """Return the argument list of ``python -m dagman_core.inference`` with JSON progress on stdout.

    ``point_ras`` (R, A, S in mm) or the lesion mask file ``mask_path`` centres a classification
    model's crop on a lesion.
    """
    validate_device(device)
    if point_ras is not None and mask_path is not None:
        raise ValueError("give a lesion point or a lesion mask, not both")
    lesion_arguments = ["--mask", str(mask_path)] if mask_path is not None else []
    if point_ras is not None:
        if len(point_ras) != 3:
            raise ValueError(f"point_ras {tuple(point_ras)} must have 3 coordinates (R, A, S in mm)")
        # One "--point=R,A,S" argument, so that argparse does not read a negative R as an option.
        lesion_arguments = ["--point=" + ",".join(repr(float(value)) for value in point_ras)]
    return [
        python_executable,
        "-m",
        INFERENCE_MODULE,
        "--model",
        str(model_dir),
        "--input",
        str(input_path),
        "--output",
        str(output_dir),
        "--device",
        device,
        "--progress",
        "json",
        *lesion_arguments,
    ]


def build_child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the child's environment: ``base`` plus ``CORE_PARENT_DIR`` first on ``PYTHONPATH``.

    ``base`` defaults to Slicer's start-up environment inside Slicer (the environment before
    the launcher changed library paths, as ``slicer.util.launchConsoleProcess`` uses it) and
    to ``os.environ`` elsewhere. ``PYTHONUNBUFFERED`` makes progress lines arrive as printed.
    """
    if base is None:
        if running_in_slicer_application():
            import slicer.util

            base = slicer.util.startupEnvironment()
        else:
            base = os.environ
    environment = dict(base)

    python_path = [str(CORE_PARENT_DIR)]
    if environment.get("PYTHONPATH"):
        python_path.append(environment["PYTHONPATH"])
    environment["PYTHONPATH"] = os.pathsep.join(python_path)
    environment["PYTHONUNBUFFERED"] = "1"
    return environment
