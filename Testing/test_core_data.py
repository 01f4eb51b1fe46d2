"""Datalists and the RAS resampling of real CT."""

import json

import numpy as np
import pytest
import SimpleITK as sitk

from dagman_core.data.datalist import build_datalist, label_names, load_datalist
from dagman_core.data.geometry import ras_affine, resample_to_ras


def write_volume(path, value=0):
    image = sitk.Image([4, 4, 4], sitk.sitkInt16) + value
    sitk.WriteImage(image, str(path))


def test_datalist_pairs_separate_folders(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for case in ("case_001", "case_002"):
        write_volume(tmp_path / "images" / f"{case}_0000.nii.gz")
        write_volume(tmp_path / "labels" / f"{case}.nii.gz")

    datalist = build_datalist(tmp_path / "images", tmp_path / "labels", tmp_path / "lists" / "datalist.json")
    assert datalist["training"][0] == {"image": "../images/case_001_0000.nii.gz", "label": "../labels/case_001.nii.gz"}
    entries = load_datalist(tmp_path / "lists" / "datalist.json", require_labels=True)
    assert entries[1]["label"] == str(tmp_path / "lists" / ".." / "labels" / "case_002.nii.gz")


def test_datalist_missing_label_names_case(tmp_path):
    write_volume(tmp_path / "lung1_image.nrrd")
    write_volume(tmp_path / "lung2_image.nrrd")
    write_volume(tmp_path / "lung1_label.nrrd")
    with pytest.raises(FileNotFoundError, match="lung2"):
        build_datalist(tmp_path, tmp_path, tmp_path / "datalist.json")


def test_load_datalist_rejects_empty_split(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps({"labels": {"1": "Lung tumor"}, "training": []}))
    with pytest.raises(ValueError, match="no entries under 'training'"):
        load_datalist(path)
    assert label_names(path) == {1: "Lung tumor"}


def test_resample_to_ras_keeps_world_positions(ct_data):
    image = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / "lung2_image.nrrd"))
    resampled = resample_to_ras(image, 2.0)

    assert resampled.GetSpacing() == (2.0, 2.0, 2.0)
    assert np.allclose(ras_affine(resampled)[:3, :3], np.diag([2.0, 2.0, 2.0]))
    # A voxel deep inside the scan has the same intensity at the same world point, up to interpolation.
    index = [size // 2 for size in image.GetSize()]
    point = image.TransformIndexToPhysicalPoint(index)
    continuous = resampled.TransformPhysicalPointToContinuousIndex(point)
    nearest = [int(round(value)) for value in continuous]
    assert abs(resampled[nearest] - image[index]) < 200
