"""DAGMaNTrainLib cohort export against real slicer-core nodes and the real pyradiomics lung CT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_fixtures import (  # noqa: F401 (slicer_scene is a fixture)
    find_ct_data_dir,
    ijk_to_ras_array,
    oblique_directions,
    slicer_scene,
)

import slicer  # noqa: E402
import slicer.util  # noqa: E402
import vtk  # noqa: E402
from DAGMaNLib.synthetic import add_synthetic_ct_volume  # noqa: E402
from DAGMaNTrainLib import (  # noqa: E402
    assign_label_values,
    assign_validation_split,
    build_cases,
    export_cohort,
    segmentation_to_label_array,
)
from DAGMaNTrainLib.atomic import write_json_atomically  # noqa: E402

CT_DATA_DIR = find_ct_data_dir()
LUNG_DIR = CT_DATA_DIR / "pyradiomics_lung_tumor" if CT_DATA_DIR else None
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


def read_volume(scene, path: Path, node_class: str, name: str):
    node = scene.AddNewNodeByClass(node_class, name)
    storage_node = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage_node.SetFileName(str(path))
    assert storage_node.ReadData(node), f"could not read {path}"
    return node


def add_segmentation_from_labelmap(scene, labelmap_node, reference_volume_node, names_by_value: dict[int, str]):
    """Import ``labelmap_node`` into a new segmentation node and name its segments by label value."""
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{reference_volume_node.GetName()} seg")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    segment_ids = vtk.vtkStringArray()
    for value in range(1, max(names_by_value) + 1):
        name = names_by_value.get(value, f"unused {value}")
        segment_ids.InsertNextValue(segmentation_node.GetSegmentation().AddEmptySegment(name, name))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(
        labelmap_node, segmentation_node, segment_ids
    )
    return segmentation_node


def synthetic_labels(shape_kji) -> np.ndarray:
    """Label 1 ("Lung tumor") inside, label 2 ("Lung") around it, without overlap."""
    labels = np.zeros(shape_kji, dtype=np.uint8)
    labels[1:7, 2:12, 3:14] = 2
    labels[3:5, 4:8, 6:10] = 1
    return labels


@pytest.fixture
def oblique_case(slicer_scene):
    """A synthetic oblique CT named with characters that are not file-safe, with "Lung" then "Lung tumor" segments."""
    volume_node = add_synthetic_ct_volume(
        slicer_scene,
        name="Oblique CT (B)",
        shape_kji=(8, 14, 16),
        spacing_mm=(0.7, 0.8, 2.5),
        origin_ras_mm=(10.5, -20.25, 33.0),
        directions=oblique_directions(),
    )
    labelmap_node = slicer_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "oblique labels")
    labelmap_node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras_array(volume_node)))
    slicer.util.updateVolumeFromArray(labelmap_node, synthetic_labels((8, 14, 16)))
    # Segment order "Lung", "Lung tumor": the opposite of the lung2 case, to check stable label values.
    segmentation_node = add_segmentation_from_labelmap(
        slicer_scene, labelmap_node, volume_node, {1: "Lung tumor", 2: "Lung"}
    )
    segmentation = segmentation_node.GetSegmentation()
    segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("Lung"), 0)
    slicer_scene.RemoveNode(labelmap_node)
    return volume_node, segmentation_node


@pytest.fixture
def lung2_case(slicer_scene):
    if LUNG_DIR is None or not (LUNG_DIR / "lung2_image.nrrd").is_file():
        pytest.skip(
            "real lung CT pyradiomics_lung_tumor/lung2_image.nrrd not found under shared/data/ct "
            "(set DAGMAN_TEST_DATA to the folder holding it)"
        )
    volume_node = read_volume(slicer_scene, LUNG_DIR / "lung2_image.nrrd", "vtkMRMLScalarVolumeNode", "lung2")
    labelmap_node = read_volume(slicer_scene, LUNG_DIR / "lung2_label.nrrd", "vtkMRMLLabelMapVolumeNode", "lung2 label")
    segmentation_node = add_segmentation_from_labelmap(slicer_scene, labelmap_node, volume_node, {1: "Lung tumor"})
    slicer_scene.RemoveNode(labelmap_node)
    return volume_node, segmentation_node


@pytest.fixture
def exported(slicer_scene, lung2_case, oblique_case, tmp_path):
    cases = assign_validation_split(build_cases([lung2_case[0], oblique_case[0]]), 0.5)
    labelmaps_before = slicer_scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode")
    export = export_cohort(cases, tmp_path / "cohort")
    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == labelmaps_before
    return export, tmp_path / "cohort"


def test_export_datalist_format(exported):
    export, output_dir = exported
    datalist = json.loads((output_dir / "datalist.json").read_text(encoding="utf-8"))

    assert datalist["labels"] == {"0": "background", "1": "Lung tumor", "2": "Lung"}
    assert datalist["training"] == [{"image": "cases/lung2_image.nrrd", "label": "cases/lung2_label.nrrd"}]
    assert datalist["validation"] == [
        {"image": "cases/Oblique_CT_B_image.nrrd", "label": "cases/Oblique_CT_B_label.nrrd"}
    ]
    for entry in datalist["training"] + datalist["validation"]:
        assert not Path(entry["image"]).is_absolute()
        assert (output_dir / entry["image"]).is_file()
        assert (output_dir / entry["label"]).is_file()
    assert export.datalist == datalist
    assert export.label_values == {"Lung tumor": 1, "Lung": 2}


def test_export_leaves_no_partial_files(exported):
    _, output_dir = exported
    names = sorted(path.name for path in output_dir.rglob("*") if path.is_file())

    assert names == [
        "Oblique_CT_B_image.nrrd",
        "Oblique_CT_B_label.nrrd",
        "datalist.json",
        "lung2_image.nrrd",
        "lung2_label.nrrd",
    ]


def test_lung2_image_matches_source(exported):
    _, output_dir = exported
    source = sitk.ReadImage(str(LUNG_DIR / "lung2_image.nrrd"))
    written = sitk.ReadImage(str(output_dir / "cases" / "lung2_image.nrrd"))

    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
    assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-5)
    assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(source))


def test_lung2_label_matches_source(exported):
    _, output_dir = exported
    source = sitk.ReadImage(str(LUNG_DIR / "lung2_label.nrrd"))
    written = sitk.ReadImage(str(output_dir / "cases" / "lung2_label.nrrd"))
    written_labels = sitk.GetArrayFromImage(written)

    assert written_labels.dtype == np.uint8
    assert written.GetSize() == source.GetSize()
    assert np.allclose(written.GetSpacing(), source.GetSpacing(), atol=1e-6)
    assert np.allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-5)
    assert np.allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    assert np.array_equal(written_labels, (sitk.GetArrayFromImage(source) == 1).astype(np.uint8))
    assert int(written_labels.sum()) > 0


def test_oblique_case_geometry_and_labels(exported, oblique_case):
    _, output_dir = exported
    volume_node, _ = oblique_case
    matrix = ijk_to_ras_array(volume_node)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    expected_direction = LPS_FROM_RAS @ (matrix[:3, :3] / spacing)
    expected_origin = LPS_FROM_RAS @ matrix[:3, 3]

    for suffix in ("_image.nrrd", "_label.nrrd"):
        image = sitk.ReadImage(str(output_dir / "cases" / f"Oblique_CT_B{suffix}"))
        assert np.allclose(image.GetSpacing(), spacing, atol=1e-6)
        assert np.allclose(image.GetOrigin(), expected_origin, atol=1e-5)
        assert np.allclose(np.reshape(image.GetDirection(), (3, 3)), expected_direction, atol=1e-6)

    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output_dir / "cases" / "Oblique_CT_B_label.nrrd")))
    # "Lung tumor" is 1 in every case, because lung2 named it first.
    assert np.array_equal(labels, synthetic_labels((8, 14, 16)))
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(output_dir / "cases" / "Oblique_CT_B_image.nrrd")))
    assert np.array_equal(image, slicer.util.arrayFromVolume(volume_node))


def test_datalist_readable_by_finetune_loader(exported):
    from dagman_core.data.datalist import label_names, load_datalist

    _, output_dir = exported
    training = load_datalist(output_dir / "datalist.json", "training", require_labels=True)
    validation = load_datalist(output_dir / "datalist.json", "validation", require_labels=True)

    assert Path(training[0]["image"]) == output_dir / "cases" / "lung2_image.nrrd"
    assert Path(validation[0]["label"]) == output_dir / "cases" / "Oblique_CT_B_label.nrrd"
    assert label_names(output_dir / "datalist.json") == {0: "background", 1: "Lung tumor", 2: "Lung"}


def test_label_values_follow_explicit_names(oblique_case):
    _, segmentation_node = oblique_case

    assert assign_label_values([segmentation_node]) == {"Lung": 1, "Lung tumor": 2}
    assert assign_label_values([segmentation_node], ["Lung tumor", "Lung"]) == {"Lung tumor": 1, "Lung": 2}


def test_overlapping_segments_higher_value_wins(slicer_scene):
    volume_node = add_synthetic_ct_volume(slicer_scene, shape_kji=(4, 6, 6))
    segmentation_node = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "overlap")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation = segmentation_node.GetSegmentation()
    for name in ("big", "small"):
        segmentation.AddEmptySegment(name, name)
    big = np.zeros((4, 6, 6), np.uint8)
    big[1:3, 1:5, 1:5] = 1
    small = np.zeros((4, 6, 6), np.uint8)
    small[2, 2:4, 2:4] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(big, segmentation_node, "big", volume_node)
    slicer.util.updateSegmentBinaryLabelmapFromArray(small, segmentation_node, "small", volume_node)

    labels = segmentation_to_label_array(segmentation_node, volume_node, {"small": 2, "big": 1})

    expected = big.copy()
    expected[small == 1] = 2
    assert np.array_equal(labels, expected)


def test_volume_without_segmentation_rejected(slicer_scene, oblique_case):
    lonely = add_synthetic_ct_volume(slicer_scene, name="No segmentation CT", shape_kji=(4, 6, 6))

    with pytest.raises(ValueError, match="No segmentation found for volumes \\['No segmentation CT'\\]"):
        build_cases([oblique_case[0], lonely])


def test_transformed_volume_rejected(slicer_scene, oblique_case, tmp_path):
    volume_node, _ = oblique_case
    transform_node = slicer_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    volume_node.SetAndObserveTransformNodeID(transform_node.GetID())

    with pytest.raises(ValueError, match="harden the transform"):
        export_cohort(build_cases([volume_node]), tmp_path / "out")
    assert not (tmp_path / "out" / "datalist.json").exists()


def test_duplicate_volume_names_made_unique(slicer_scene, oblique_case):
    volume_node, segmentation_node = oblique_case
    twin = add_synthetic_ct_volume(slicer_scene, name="Oblique CT [B]", shape_kji=(4, 6, 6))

    cases = build_cases([volume_node, twin], [segmentation_node, segmentation_node])

    assert [case.name for case in cases] == ["Oblique_CT_B", "Oblique_CT_B_2"]


def test_failed_json_write_keeps_old_file(tmp_path):
    target = tmp_path / "datalist.json"
    target.write_text('{"training": []}\n', encoding="utf-8")

    with pytest.raises(TypeError):
        write_json_atomically({"training": [object()]}, target)

    assert target.read_text(encoding="utf-8") == '{"training": []}\n'
    assert sorted(path.name for path in tmp_path.iterdir()) == ["datalist.json"]


def test_transformed_segmentation_resampled(slicer_scene):
    volume_node = add_synthetic_ct_volume(slicer_scene, shape_kji=(4, 8, 8), spacing_mm=(1.0, 1.0, 1.0))
    segmentation_node = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "shifted")
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.GetSegmentation().AddEmptySegment("spot", "spot")
    spot = np.zeros((4, 8, 8), np.uint8)
    spot[1, 2, 2] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(spot, segmentation_node, "spot", volume_node)
    transform_node = slicer_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "3 mm along R")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 3.0)
    transform_node.SetMatrixTransformToParent(shift)
    segmentation_node.SetAndObserveTransformNodeID(transform_node.GetID())

    labels = segmentation_to_label_array(segmentation_node, volume_node, {"spot": 1})

    # The volume's I axis points along R with 1 mm spacing, so the spot moves 3 voxels along I.
    assert np.argwhere(labels).tolist() == [[1, 2, 5]]


def test_finetune_reads_exported_cohort(exported, tmp_path):
    """The exported cohort trains with the real ``dagman pretrain`` and ``dagman finetune`` commands."""
    import subprocess
    import sys

    _, output_dir = exported
    datalist = output_dir / "datalist.json"

    def dagman(*arguments: str) -> None:
        process = subprocess.run([sys.executable, "-m", "dagman_train.cli", *arguments], capture_output=True, text=True, timeout=900)
        assert process.returncode == 0, f"dagman {arguments[0]} failed:\n{process.stderr}"

    dagman("pretrain", "--config", "tiny_cpu", "--datalist", str(datalist), "--output", str(tmp_path / "pretrain"), "--max-steps", "1")
    dagman("finetune", "--pretrained", str(tmp_path / "pretrain"), "--datalist", str(datalist), "--output", str(tmp_path / "finetune"), "--max-steps", "1")

    info = json.loads((tmp_path / "finetune" / "finetune.json").read_text(encoding="utf-8"))
    assert info["labels"] == {"1": "Lung tumor", "2": "Lung"}
    assert info["num_classes"] == 3
    assert info["training_data"]["cases"] == 1
    assert np.isfinite(info["final_loss"])
