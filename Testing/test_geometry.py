"""Results are identical in RAS whatever the voxel order, flips and obliquity of the stored CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dagman_core.data.geometry import ras_affine, ras_grid_for, resample_to_ras
from dagman_core.data.io import same_geometry
from dagman_core.metrics import dice
from dagman_core.inference.pipeline import run_inference

from conftest import LUNG2_TUMOR_BLOCK


def crop_lung2(ct_data: Path) -> sitk.Image:
    """The block of lung2 around its tumor, in HU."""
    image = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / "lung2_image.nrrd"))
    return image[LUNG2_TUMOR_BLOCK]


def flipped(image: sitk.Image, axis: int) -> sitk.Image:
    """The same physical volume stored with voxel axis ``axis`` reversed."""
    array = sitk.GetArrayFromImage(image)
    array = np.flip(array, axis=2 - axis).copy()
    result = sitk.GetImageFromArray(array)
    result.SetSpacing(image.GetSpacing())
    last = [0, 0, 0]
    last[axis] = image.GetSize()[axis] - 1
    result.SetOrigin(image.TransformIndexToPhysicalPoint(last))
    direction = np.array(image.GetDirection()).reshape(3, 3)
    direction[:, axis] *= -1
    result.SetDirection(direction.flatten().tolist())
    return result


def permuted(image: sitk.Image, order: tuple[int, int, int]) -> sitk.Image:
    """The same physical volume stored with its voxel axes in ``order``."""
    result = sitk.PermuteAxes(image, list(order))
    direction = np.array(image.GetDirection()).reshape(3, 3)[:, list(order)]
    result.SetDirection(direction.flatten().tolist())
    result.SetSpacing([image.GetSpacing()[axis] for axis in order])
    result.SetOrigin(image.GetOrigin())
    return result


def oblique(image: sitk.Image, degrees: tuple[float, float, float]) -> sitk.Image:
    """The same anatomy resampled onto a grid rotated by ``degrees`` about x, y and z (1 mm voxels)."""
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*np.deg2rad(degrees))
    direction = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.array(image.GetDirection()).reshape(3, 3)
    corners = ras_grid_for(image, 1.0)
    grid = sitk.Image([int(size * 1.15) for size in corners.GetSize()], sitk.sitkFloat32)
    grid.SetSpacing([1.0, 1.0, 1.0])
    grid.SetDirection(direction.flatten().tolist())
    center = np.array(image.TransformContinuousIndexToPhysicalPoint([(size - 1) / 2 for size in image.GetSize()]))
    half = direction @ (np.array(grid.GetSize()) - 1) / 2.0
    grid.SetOrigin((center - half).tolist())
    return sitk.Resample(image, grid, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)


def test_ras_grid_lies_on_world_lattice():
    image = sitk.Image([10, 12, 7], sitk.sitkInt16)
    image.SetSpacing([0.7, 0.9, 2.5])
    image.SetOrigin([-13.3, 40.1, -70.2])
    grid = ras_grid_for(image, 2.0)

    assert np.allclose(np.mod(grid.GetOrigin(), 2.0) * (np.abs(np.mod(grid.GetOrigin(), 2.0) - 2.0) > 1e-6), 0.0)
    affine = ras_affine(grid)
    assert np.allclose(affine[:3, :3], np.diag([2.0, 2.0, 2.0]))


def test_flipped_and_permuted_map_to_same_ras_voxels(ct_data):
    image = crop_lung2(ct_data)
    expected = sitk.GetArrayFromImage(resample_to_ras(image, 2.0))
    for variant in (flipped(image, 0), flipped(image, 2), permuted(image, (2, 0, 1))):
        resampled = resample_to_ras(variant, 2.0)
        assert resampled.GetSize() == tuple(reversed(expected.shape))
        np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), expected, atol=1e-3)


@pytest.fixture(scope="module")
def original_result(ct_data, trained_tumor_bundle, tmp_path_factory):
    image = crop_lung2(ct_data)
    folder = tmp_path_factory.mktemp("geometry")
    sitk.WriteImage(image, str(folder / "original.nrrd"))
    run_inference(trained_tumor_bundle, folder / "original.nrrd", folder / "original", device="cpu")
    return image, folder


def _attention_on(grid: sitk.Image, folder: Path) -> np.ndarray:
    attention = sitk.Resample(sitk.ReadImage(str(folder / "attention.nrrd")), grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    return sitk.GetArrayFromImage(attention)


def _result_on(grid: sitk.Image, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    segmentation = sitk.Resample(sitk.ReadImage(str(folder / "segmentation.nrrd")), grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return sitk.GetArrayFromImage(segmentation), _attention_on(grid, folder)


@pytest.mark.parametrize("variant", ["flip_i", "flip_k", "permute_kij"])
def test_stored_variants_give_identical_results(original_result, trained_tumor_bundle, variant):
    image, folder = original_result
    stored = {"flip_i": lambda: flipped(image, 0), "flip_k": lambda: flipped(image, 2), "permute_kij": lambda: permuted(image, (2, 0, 1))}[variant]()
    sitk.WriteImage(stored, str(folder / f"{variant}.nrrd"))
    run_inference(trained_tumor_bundle, folder / f"{variant}.nrrd", folder / variant, device="cpu")

    assert same_geometry(sitk.ReadImage(str(folder / variant / "segmentation.nrrd")), stored)
    segmentation, attention = _result_on(image, folder / variant)
    expected_segmentation, expected_attention = _result_on(image, folder / "original")
    np.testing.assert_array_equal(segmentation, expected_segmentation)
    np.testing.assert_allclose(attention, expected_attention, atol=1e-5)


def test_oblique_storage_gives_matching_results(original_result, trained_tumor_bundle):
    image, folder = original_result
    stored = oblique(image, (4.0, -3.0, 8.0))
    assert not np.allclose(np.array(stored.GetDirection()).reshape(3, 3), np.eye(3))
    sitk.WriteImage(stored, str(folder / "oblique.nrrd"))
    run_inference(trained_tumor_bundle, folder / "oblique.nrrd", folder / "oblique", device="cpu")

    assert same_geometry(sitk.ReadImage(str(folder / "oblique" / "attention.nrrd")), stored)
    segmentation, attention = _result_on(image, folder / "oblique")
    expected_segmentation, expected_attention = _result_on(image, folder / "original")

    # NOTE: an oblique copy is a resampled copy with other cut edges, so results match up to
    # interpolation and window placement, not bit for bit. Mirrored results are the control: a
    # misplaced result overlaps far less. The briefly trained model's attention is nearly flat, so it
    # has no pattern to compare. The classification crop below checks the attention's placement on an
    # oblique grid, and the flipped and permuted copies check the attention exactly.
    tumor, expected_tumor = segmentation == 1, expected_segmentation == 1
    assert expected_tumor.sum() > 1000
    overlap = dice(tumor, expected_tumor)
    assert overlap > 0.5
    for mirrored in (tumor[:, :, ::-1], tumor[:, ::-1], tumor[::-1]):
        assert overlap > dice(mirrored, expected_tumor) + 0.25


def test_oblique_storage_places_classification_crop(original_result, tmp_path):
    from dagman_core.bundle import write_random_bundle

    image, folder = original_result
    classifier = write_random_bundle(tmp_path / "classifier", task="classification")
    stored = oblique(image, (4.0, -3.0, 8.0))
    sitk.WriteImage(stored, str(tmp_path / "oblique.nrrd"))
    # A point near one corner of the block, so that the 128 mm crop covers only part of it.
    x, y, z = image.TransformContinuousIndexToPhysicalPoint((60.0, 60.0, 10.0))
    point_ras = (-x, -y, z)

    run_inference(classifier, folder / "original.nrrd", tmp_path / "original", device="cpu", point_ras=point_ras)
    run_inference(classifier, tmp_path / "oblique.nrrd", tmp_path / "oblique", device="cpu", point_ras=point_ras)

    # The attention is nonzero exactly inside the crop, so its support shows where the crop landed.
    crop = _attention_on(image, tmp_path / "oblique") > 0
    expected_crop = _attention_on(image, tmp_path / "original") > 0
    assert 0.2 < expected_crop.mean() < 0.8
    overlap = dice(crop, expected_crop)
    assert overlap > 0.9
    for mirrored in (crop[:, :, ::-1], crop[:, ::-1]):
        assert overlap > dice(mirrored, expected_crop) + 0.2
