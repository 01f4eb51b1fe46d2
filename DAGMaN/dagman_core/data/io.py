"""Reading CT volumes (NIfTI, NRRD, MHA, DICOM series) and writing results with an exact geometry."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def is_image_file(path: str | os.PathLike) -> bool:
    """Return True when ``path`` names a volume file this package reads (by its suffix)."""
    name = Path(path).name.lower()
    return any(name.endswith(suffix) for suffix in IMAGE_SUFFIXES)


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a volume file or a DICOM series folder into a SimpleITK image.

    The image keeps its spacing (mm), origin (mm, LPS) and direction. A folder is read as the
    DICOM series it contains; a folder with several series is read by its largest series.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is neither a supported volume file nor a folder with a DICOM series.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input image not found: {path}")

    if path.is_dir():
        return _read_dicom_series(path)

    if not is_image_file(path) and path.suffix.lower() != ".dcm":
        raise ValueError(
            f"unsupported image file {path}: expected one of {', '.join(IMAGE_SUFFIXES)} "
            "or a folder holding a DICOM series"
        )
    return sitk.ReadImage(str(path))


def _read_dicom_series(folder: Path) -> sitk.Image:
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not series_ids:
        raise ValueError(f"no DICOM series found in folder {folder}; pass a volume file or a DICOM series folder")

    files_per_series = {
        series_id: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_id) for series_id in series_ids
    }
    series_id = max(files_per_series, key=lambda key: len(files_per_series[key]))
    if len(series_ids) > 1:
        logger.warning(
            "folder %s contains %d DICOM series; reading the largest (%s, %d files)",
            folder,
            len(series_ids),
            series_id,
            len(files_per_series[series_id]),
        )

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_per_series[series_id])
    return reader.Execute()


def copy_geometry(array_kji: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """Wrap a numpy array in (K, J, I) order as an image with the reference's spacing, origin and direction."""
    if tuple(array_kji.shape) != tuple(reversed(reference.GetSize())):
        raise ValueError(
            f"array shape {tuple(array_kji.shape)} (K, J, I) does not match the reference image size "
            f"{reference.GetSize()} (I, J, K)"
        )
    image = sitk.GetImageFromArray(array_kji)
    image.CopyInformation(reference)
    return image


def write_image_atomic(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``image`` to ``path`` through a temporary file in the same folder, so no partial file remains."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".nrrd"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, temporary, compress)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def current_umask() -> int:
    """Return the process umask, so files written through ``mkstemp`` get the usual permissions."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def same_geometry(first: sitk.Image, second: sitk.Image, tolerance: float = 1e-6) -> bool:
    """Return True when both images share size, and spacing, origin and direction within ``tolerance``."""
    return (
        first.GetSize() == second.GetSize()
        and np.allclose(first.GetSpacing(), second.GetSpacing(), atol=tolerance)
        and np.allclose(first.GetOrigin(), second.GetOrigin(), atol=tolerance)
        and np.allclose(first.GetDirection(), second.GetDirection(), atol=tolerance)
    )
