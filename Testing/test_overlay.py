"""Tests of the three-plane attention overlay PNG."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

try:
    from dagman_train.overlay import render_overlay
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DAGMaNTrain"))
    from dagman_train.overlay import render_overlay

SHARED = Path("/work/shared/data/ct/pyradiomics_lung_tumor")
EXPECTED_SIZE = (1560, 600)


def _gaussian_attention(reference: sitk.Image, mask: np.ndarray, sigma_mm: float = 20.0) -> sitk.Image:
    """Return a Gaussian blob (peak 1, sigma in mm) at the mask centroid on the reference grid."""
    center = np.argwhere(mask).mean(axis=0)
    spacing_zyx = np.array(reference.GetSpacing())[::-1]
    grid = np.indices(mask.shape, dtype=np.float32)
    r2 = sum(((grid[i] - center[i]) * spacing_zyx[i]) ** 2 for i in range(3))
    attention = sitk.GetImageFromArray(np.exp(-r2 / (2 * sigma_mm**2)).astype(np.float32))
    attention.CopyInformation(reference)
    return attention


def _assert_png(path: Path) -> None:
    assert path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.size == EXPECTED_SIZE
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 20.0
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500
    assert not list(path.parent.glob(f".{path.name}.*"))


def _small_case(tmp_path: Path, direction=None) -> tuple[Path, Path, Path]:
    """Write a 40 x 36 x 20 phantom (HU) with a tumor, its mask and attention as NRRD."""
    z, y, x = np.indices((20, 36, 40))
    body = ((x - 20) / 17.0) ** 2 + ((y - 18) / 14.0) ** 2 <= 1
    ct = np.where(body, -800.0, -1000.0).astype(np.float32)
    tumor = ((x - 26) ** 2 + (y - 15) ** 2 + ((z - 10) * 2.5) ** 2) <= 16
    ct[tumor] = 40.0

    paths = []
    for name, array in (("ct", ct), ("seg", tumor.astype(np.uint8))):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.0))
        image.SetOrigin((-16.0, -14.0, -20.0))
        if direction is not None:
            image.SetDirection(direction)
        paths.append(tmp_path / f"{name}.nrrd")
        sitk.WriteImage(image, str(paths[-1]))
        if name == "ct":
            reference = image
    attention = _gaussian_attention(reference, tumor, sigma_mm=4.0)
    paths.append(tmp_path / "attention.nrrd")
    sitk.WriteImage(attention, str(paths[-1]))
    return tuple(paths)


def test_real_lung_ct_overlay(tmp_path):
    if not (SHARED / "lung2_image.nrrd").is_file():
        pytest.skip(f"real CT {SHARED / 'lung2_image.nrrd'} is absent")
    label = sitk.ReadImage(str(SHARED / "lung2_label.nrrd"))
    attention_path = tmp_path / "attention.nrrd"
    sitk.WriteImage(_gaussian_attention(label, sitk.GetArrayFromImage(label) > 0), str(attention_path))
    output = tmp_path / "figures" / "lung2_overlay.png"

    result = render_overlay(
        SHARED / "lung2_image.nrrd", SHARED / "lung2_label.nrrd", attention_path, output,
        reference_label_path=SHARED / "lung2_label.nrrd", title="lung2: synthetic attention",
    )

    assert result == output
    _assert_png(output)


def test_geometry_mismatch_raises(tmp_path):
    ct_path, seg_path, attention_path = _small_case(tmp_path)
    shifted = sitk.ReadImage(str(attention_path))
    shifted.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(shifted, str(attention_path))

    with pytest.raises(ValueError, match="geometry") as info:
        render_overlay(ct_path, seg_path, attention_path, tmp_path / "x.png")
    assert "(0.0, 0.0, 0.0)" in str(info.value)
    assert "(-16.0, -14.0, -20.0)" in str(info.value)
    assert not (tmp_path / "x.png").exists()


def test_flipped_direction_renders(tmp_path):
    flipped = (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0)
    paths = _small_case(tmp_path, direction=flipped)
    output = render_overlay(*paths, tmp_path / "flipped.png")
    _assert_png(output)


def test_oblique_direction_renders(tmp_path):
    a, b = np.deg2rad(25.0), np.deg2rad(17.0)
    about_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    about_x = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    oblique = tuple((about_x @ about_z).ravel())
    paths = _small_case(tmp_path, direction=oblique)
    output = render_overlay(*paths, tmp_path / "oblique.png", reference_label_path=paths[1])
    _assert_png(output)


def test_empty_segmentation_uses_attention(tmp_path):
    ct_path, seg_path, attention_path = _small_case(tmp_path)
    empty = sitk.ReadImage(str(seg_path)) * 0
    sitk.WriteImage(empty, str(seg_path))
    output = render_overlay(ct_path, seg_path, attention_path, tmp_path / "empty.png")
    _assert_png(output)
