"""Python packages that the inference child process needs in Slicer's Python environment.

PythonSlicer shares Slicer's site-packages, so a package can be checked from the Slicer
process with ``importlib.util.find_spec`` without importing it (importing torch at Slicer
start-up is slow and may fail). torch itself comes from Slicer's PyTorch extension; the
others are installed with ``slicer.util.pip_install``.
"""

from __future__ import annotations

import importlib.util
from typing import Mapping

TORCH_IMPORT_NAME = "torch"
TORCH_VERSION_REQUIREMENT = ">=2.4"  # the same lower bound as pyproject.toml

# Import name -> pip requirement, for the packages that dagman_core imports besides torch,
# numpy and SimpleITK (which Slicer ships), plus psutil for stopping the process tree.
REQUIRED_PACKAGES: dict[str, str] = {
    "monai": "monai==1.6.1",
    "einops": "einops>=0.7",
    "safetensors": "safetensors>=0.4",
    "yaml": "pyyaml>=6.0",
    "tqdm": "tqdm>=4.60",
    "nibabel": "nibabel>=5.0",
    "psutil": "psutil>=5.9",
}


def is_installed(import_name: str) -> bool:
    """Return whether ``import_name`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(import_name) is not None
    except (ImportError, ValueError):
        return False


def missing_requirements(packages: Mapping[str, str] = REQUIRED_PACKAGES) -> list[str]:
    """Return the pip requirements of ``packages`` whose import name is not installed, in order.

    NOTE: an installed package counts whatever its version, so a MONAI that another extension
    installed is kept rather than replaced by the pinned one. The torch probe then checks that it imports.
    """
    return [requirement for import_name, requirement in packages.items() if not is_installed(import_name)]


def torch_installed() -> bool:
    """Return whether torch can be imported (in Slicer: whether the PyTorch extension installed it)."""
    return is_installed(TORCH_IMPORT_NAME)
