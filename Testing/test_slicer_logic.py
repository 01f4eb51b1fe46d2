"""DAGMaNLogic against real slicer-core nodes, with a fake runner that writes known outputs in-process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_fixtures import (  # noqa: F401 (slicer_scene* are fixtures)
    ijk_to_ras_array,
    oblique_directions,
    slicer_scene,
    slicer_scene_with_views,
)

import slicer  # noqa: E402
import slicer.util  # noqa: E402
from DAGMaNLib import DAGMaNLogic, InferenceError  # noqa: E402
from DAGMaNLib.display import COLOR_TABLE_ATTRIBUTE, inferno_colors  # noqa: E402
from DAGMaNLib.outputs import (  # noqa: E402
    ATTRIBUTE_DEVICE,
    ATTRIBUTE_LAYER,
    ATTRIBUTE_MODEL_NAME,
    ATTRIBUTE_MODEL_SHA256,
    ATTRIBUTE_SOURCE_VOLUME,
)
from DAGMaNLib.synthetic import add_synthetic_ct_volume  # noqa: E402

SHAPE_KJI = (12, 20, 24)
SPACING_MM = (0.7, 0.8, 2.5)
ORIGIN_RAS_MM = (-12.5, 30.25, -41.0)
PEAK_KJI = (5, 7, 9)
MODEL_SHA256 = "ab" * 32

LABELS = [
    {
        "value": 1,
        "name": "Lung tumor",
        "color": [0.86, 0.31, 0.24],
        "terminology": {
            "category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"},
            "type": {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"},
            "region": {"scheme": "SCT", "code": "39607008", "meaning": "Lung"},
        },
    },
    {
        "value": 2,
        "name": "Lung",
        "color": [0.2, 0.6, 0.9],
        "terminology": {
            "category": {"scheme": "SCT", "code": "123037004", "meaning": "Anatomical Structure"},
            "type": {"scheme": "SCT", "code": "39607008", "meaning": "Lung"},
        },
    },
    {"value": 3, "name": "Pleural effusion", "color": [0.9, 0.9, 0.2]},
]


def expected_label_array(shape_kji) -> np.ndarray:
    """Return the uint8 label map that the fake writes: label 2 region with a label 1 core."""
    labels = np.zeros(shape_kji, dtype=np.uint8)
    labels[2:9, 3:15, 4:20] = 2
    labels[4:7, 5:10, 7:12] = 1
    return labels


def expected_attention_array(shape_kji) -> np.ndarray:
    """Return float32 attention in [0, 1] with its single maximum 1.0 at ``PEAK_KJI``."""
    k, j, i = np.indices(shape_kji, dtype=np.float32)
    distance2 = (k - PEAK_KJI[0]) ** 2 + (j - PEAK_KJI[1]) ** 2 + (i - PEAK_KJI[2]) ** 2
    return np.exp(-distance2 / 8.0).astype(np.float32)


class FinishedFakeChild:
    """A ``ChildProcess`` that has already exited with ``returncode`` and the given output."""

    def __init__(self, stdout_lines, returncode=0, stderr=""):
        self._stdout_lines = list(stdout_lines)
        self._returncode = returncode
        self._stderr = stderr

    @property
    def pid(self):
        return None

    def poll(self):
        return self._returncode

    def read_stdout_lines(self):
        lines, self._stdout_lines = self._stdout_lines, []
        return lines

    def read_stderr_lines(self):
        lines, self._stderr = self._stderr.splitlines(), ""
        return lines

    def kill_tree(self):
        pass


class FakeInferenceRunner:
    """Writes segmentation.nrrd, attention.nrrd and result.json on the input's geometry, like the real child."""

    def __init__(self):
        self.commands = []
        self.environments = []

    def start(self, command, env=None):
        self.commands.append(list(command))
        self.environments.append(env)
        input_path = Path(command[command.index("--input") + 1])
        output_dir = Path(command[command.index("--output") + 1])

        reference = sitk.ReadImage(str(input_path))
        segmentation = sitk.GetImageFromArray(expected_label_array(sitk.GetArrayFromImage(reference).shape))
        segmentation.CopyInformation(reference)
        sitk.WriteImage(segmentation, str(output_dir / "segmentation.nrrd"), True)
        attention = sitk.GetImageFromArray(expected_attention_array(sitk.GetArrayFromImage(reference).shape))
        attention.CopyInformation(reference)
        sitk.WriteImage(attention, str(output_dir / "attention.nrrd"), True)

        result = {
            "task": "segmentation",
            "model": {"name": "fake-tiny", "sha256": MODEL_SHA256},
            "device": "cpu",
            "timings_s": {"total": 0.1},
            "labels": LABELS,
            "outputs": {"segmentation": "segmentation.nrrd", "attention": "attention.nrrd"},
        }
        (output_dir / "result.json").write_text(json.dumps(result), encoding="utf-8")

        stdout = [
            json.dumps({"stage": "load", "fraction": 0.1, "message": "Loading model"}),
            "a plain warning line from a library",
            json.dumps({"stage": "infer", "fraction": 0.8, "message": "Sliding window"}),
            json.dumps({"stage": "done", "fraction": 1.0, "message": "Finished"}),
        ]
        return FinishedFakeChild(stdout)


def fake_model_dir(folder: Path, task: str) -> Path:
    """Return a model folder whose model.json names ``task``; the fake runner needs no weights."""
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps({"task": task}), encoding="utf-8")
    return folder


@pytest.fixture
def oblique_ct(slicer_scene_with_views):
    """An oblique, anisotropic CT volume node (0.7 x 0.8 x 2.5 mm, rotated axes, nonzero origin)."""
    return add_synthetic_ct_volume(
        slicer_scene_with_views,
        name="Oblique CT",
        shape_kji=SHAPE_KJI,
        spacing_mm=SPACING_MM,
        origin_ras_mm=ORIGIN_RAS_MM,
        directions=oblique_directions(),
    )


@pytest.fixture
def fake_run(oblique_ct, tmp_path):
    """Run the logic with ``FakeInferenceRunner`` on ``oblique_ct`` and return (outputs, runner, progress)."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    runner = FakeInferenceRunner()
    progress = []
    logic = DAGMaNLogic(runner=runner, python_executable="python-for-test")
    outputs = logic.run(oblique_ct, model_dir, device="cpu", progress_callback=lambda f, m: progress.append((f, m)))
    return outputs, runner, progress


def test_fake_run_command_line(fake_run, tmp_path):
    _, runner, _ = fake_run
    command = runner.commands[0]

    assert command[:3] == ["python-for-test", "-m", "dagman_core.inference"]
    assert command[command.index("--model") + 1] == str((tmp_path / "model").resolve())
    assert command[command.index("--device") + 1] == "cpu"
    assert command[command.index("--progress") + 1] == "json"
    assert command[command.index("--input") + 1].endswith(".nrrd")
    assert str(Path(__file__).resolve().parents[1] / "DAGMaN") in runner.environments[0]["PYTHONPATH"]


def test_fake_run_removes_temporary_folder(fake_run):
    _, runner, _ = fake_run
    output_dir = Path(runner.commands[0][runner.commands[0].index("--output") + 1])

    assert not output_dir.exists()
    assert not output_dir.parent.exists()


def test_fake_run_progress_callback(fake_run):
    _, _, progress = fake_run
    fractions = [fraction for fraction, _ in progress]
    messages = [message for _, message in progress]

    assert "Loading model" in messages
    assert "Sliding window" in messages
    assert "a plain warning line from a library" not in messages
    assert fractions == sorted(fractions)
    assert progress[-1] == (1.0, "Done")


def test_segmentation_segments_named_and_colored(fake_run, oblique_ct):
    outputs, _, _ = fake_run
    segmentation = outputs.segmentation_node.GetSegmentation()

    names = [segmentation.GetNthSegment(index).GetName() for index in range(segmentation.GetNumberOfSegments())]
    assert names == ["Lung tumor", "Lung", "Pleural effusion"]
    for label in LABELS:
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(label["name"]))
        assert np.allclose(segment.GetColor(), label["color"], atol=1e-6)

    reference_id = outputs.segmentation_node.GetNodeReferenceID("referenceImageGeometryRef")
    assert reference_id == oblique_ct.GetID()


def test_segmentation_terminology_tags(fake_run):
    outputs, _, _ = fake_run
    segmentation = outputs.segmentation_node.GetSegmentation()

    tumor = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Lung tumor"))
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(tumor.GetTerminology(), entry)
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"
    assert entry.GetCategoryObject().GetCodingSchemeDesignator() == "SCT"
    assert entry.GetTypeObject().GetCodeValue() == "108369006"
    assert entry.GetTypeObject().GetCodeMeaning() == "Neoplasm"
    assert entry.GetRegionObject().GetCodeValue() == "39607008"
    assert entry.GetRegionObject().GetCodeMeaning() == "Lung"

    lung = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Lung"))
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(lung.GetTerminology(), entry)
    assert entry.GetTypeObject().GetCodeValue() == "39607008"

    # A label without terminology keeps the default that Slicer gives every new segment.
    effusion = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("Pleural effusion"))
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(effusion.GetTerminology(), entry)
    assert entry.GetTypeObject().GetCodeValue() not in ("108369006", "39607008")


def test_segmentation_exports_same_voxels(fake_run, oblique_ct, slicer_scene_with_views):
    outputs, _, _ = fake_run
    labelmap_node = slicer_scene_with_views.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")

    exported = slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        outputs.segmentation_node, labelmap_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )

    assert exported
    assert np.allclose(ijk_to_ras_array(labelmap_node), ijk_to_ras_array(oblique_ct), atol=1e-6)
    assert np.array_equal(slicer.util.arrayFromVolume(labelmap_node), expected_label_array(SHAPE_KJI))


def test_segmentation_empty_label_kept(fake_run, oblique_ct):
    outputs, _, _ = fake_run
    segmentation = outputs.segmentation_node.GetSegmentation()
    effusion_id = segmentation.GetSegmentIdBySegmentName("Pleural effusion")

    voxels = slicer.util.arrayFromSegmentBinaryLabelmap(outputs.segmentation_node, effusion_id, oblique_ct)

    assert effusion_id != ""
    assert voxels.sum() == 0


def test_attention_geometry_matches_input(fake_run, oblique_ct):
    outputs, _, _ = fake_run
    attention = outputs.attention_node

    assert np.allclose(ijk_to_ras_array(attention), ijk_to_ras_array(oblique_ct), atol=1e-6)
    assert attention.GetImageData().GetDimensions() == oblique_ct.GetImageData().GetDimensions()
    assert slicer.util.arrayFromVolume(attention).dtype == np.float32


def test_attention_peak_on_expected_voxel(fake_run, oblique_ct):
    outputs, _, _ = fake_run
    voxels = slicer.util.arrayFromVolume(outputs.attention_node)

    peak_kji = np.unravel_index(int(np.argmax(voxels)), voxels.shape)
    assert tuple(int(index) for index in peak_kji) == PEAK_KJI
    assert voxels[PEAK_KJI] == pytest.approx(1.0)

    peak_ijk = np.array([PEAK_KJI[2], PEAK_KJI[1], PEAK_KJI[0], 1.0])
    peak_ras = ijk_to_ras_array(outputs.attention_node) @ peak_ijk
    expected_ras = ijk_to_ras_array(oblique_ct) @ peak_ijk
    assert np.allclose(peak_ras, expected_ras, atol=1e-6)


def test_attention_display_settings(fake_run):
    outputs, _, _ = fake_run
    display = outputs.attention_node.GetDisplayNode()
    color_node = display.GetColorNode()

    assert color_node.GetAttribute(COLOR_TABLE_ATTRIBUTE) == "inferno"
    assert color_node.GetNumberOfColors() == 256
    first, last = [0.0] * 4, [0.0] * 4
    color_node.GetColor(0, first)
    color_node.GetColor(255, last)
    # The lookup table stores 8 bits per channel.
    assert np.allclose(first[:3], inferno_colors()[0], atol=1 / 255)
    assert np.allclose(last[:3], inferno_colors()[-1], atol=1 / 255)

    assert display.GetAutoWindowLevel() == 0
    assert display.GetWindowLevelMin() == pytest.approx(0.0)
    assert display.GetWindowLevelMax() == pytest.approx(1.0)
    assert display.GetApplyThreshold() == 1
    assert display.GetAutoThreshold() == 0
    assert display.GetLowerThreshold() == pytest.approx(0.25)
    assert display.GetInterpolate() == 1
    assert slicer.modules.colors.logic().GetColorLegendDisplayNode(outputs.attention_node) is not None


def test_attention_shown_in_slice_views(fake_run, oblique_ct, slicer_scene_with_views):
    outputs, _, _ = fake_run
    scene = slicer_scene_with_views
    composite_nodes = [
        scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]

    assert len(composite_nodes) == 3
    for composite_node in composite_nodes:
        assert composite_node.GetBackgroundVolumeID() == oblique_ct.GetID()
        assert composite_node.GetForegroundVolumeID() == outputs.attention_node.GetID()
        assert composite_node.GetForegroundOpacity() == pytest.approx(0.5)


def test_attention_hide_show_and_threshold(fake_run, oblique_ct, slicer_scene_with_views):
    outputs, _, _ = fake_run
    scene = slicer_scene_with_views
    attention = outputs.attention_node
    logic = DAGMaNLogic()
    legend = slicer.modules.colors.logic().GetColorLegendDisplayNode(attention)
    composite_nodes = [
        scene.GetNthNodeByClass(index, "vtkMRMLSliceCompositeNode")
        for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))
    ]

    assert logic.set_attention_visible(False, attention) == 3
    assert all(node.GetForegroundVolumeID() is None for node in composite_nodes)
    assert all(node.GetBackgroundVolumeID() == oblique_ct.GetID() for node in composite_nodes)
    assert not legend.GetVisibility()

    logic.set_attention_opacity(0.8, attention)
    assert logic.set_attention_visible(True, attention) == 3
    assert all(node.GetForegroundVolumeID() == attention.GetID() for node in composite_nodes)
    assert all(node.GetForegroundOpacity() == pytest.approx(0.8) for node in composite_nodes)
    assert legend.GetVisibility()
    assert logic.set_attention_visible(True, attention) == 0

    logic.set_attention_threshold(0.6, attention)
    assert attention.GetDisplayNode().GetLowerThreshold() == pytest.approx(0.6)
    assert attention.GetDisplayNode().GetUpperThreshold() == pytest.approx(1.0)
    assert logic.attention_threshold == pytest.approx(0.6)
    with pytest.raises(ValueError, match="invalid lower_threshold 1.0; give a value in"):
        logic.set_attention_threshold(1.0, attention)


def test_result_node_attributes(fake_run, oblique_ct):
    outputs, _, _ = fake_run

    for node, layer in ((outputs.segmentation_node, "segmentation"), (outputs.attention_node, "attention")):
        assert node.GetAttribute(ATTRIBUTE_MODEL_NAME) == "fake-tiny"
        assert node.GetAttribute(ATTRIBUTE_MODEL_SHA256) == MODEL_SHA256
        assert node.GetAttribute(ATTRIBUTE_LAYER) == layer
        assert node.GetAttribute(ATTRIBUTE_DEVICE) == "cpu"
        assert node.GetAttribute(ATTRIBUTE_SOURCE_VOLUME) == oblique_ct.GetID()


def test_no_temporary_nodes_left(fake_run, slicer_scene_with_views):
    scene = slicer_scene_with_views

    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    # The CT and the attention map.
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2


def test_opacity_slider_updates_views(fake_run, slicer_scene_with_views):
    outputs, _, _ = fake_run
    logic = DAGMaNLogic(runner=FakeInferenceRunner())

    logic.set_attention_opacity(0.8, outputs.attention_node)

    composite_node = slicer_scene_with_views.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite_node.GetForegroundOpacity() == pytest.approx(0.8)


def test_run_without_slice_views(slicer_scene, tmp_path):
    volume_node = add_synthetic_ct_volume(slicer_scene, shape_kji=SHAPE_KJI)
    model_dir = tmp_path / "model"
    model_dir.mkdir()

    outputs = DAGMaNLogic(runner=FakeInferenceRunner(), python_executable="python").run(volume_node, model_dir)

    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 0
    assert outputs.attention_node.GetDisplayNode() is not None
    assert outputs.segmentation_node.GetSegmentation().GetNumberOfSegments() == 3


@pytest.mark.parametrize(
    "case, message",
    [
        ("no volume", "No input volume selected"),
        ("label map volume", "choose a CT scalar volume"),
        ("missing model folder", "does not exist"),
        ("bad device", "device 'tpu' is invalid"),
    ],
)
def test_invalid_inputs_rejected(slicer_scene, tmp_path, case, message):
    volume_node = add_synthetic_ct_volume(slicer_scene, shape_kji=(4, 8, 8))
    model_dir = tmp_path
    device = "cpu"
    if case == "no volume":
        volume_node = None
    elif case == "label map volume":
        volume_node = slicer_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(volume_node, np.zeros((4, 8, 8), np.uint8))
    elif case == "missing model folder":
        model_dir = tmp_path / "absent"
    elif case == "bad device":
        device = "tpu"
    runner = FakeInferenceRunner()

    with pytest.raises(ValueError, match=message):
        DAGMaNLogic(runner=runner, python_executable="python").run(volume_node, model_dir, device=device)
    assert runner.commands == []


def test_removed_volume_discards_results(slicer_scene, tmp_path):
    volume_node = add_synthetic_ct_volume(slicer_scene, shape_kji=SHAPE_KJI)
    logic = DAGMaNLogic(runner=FakeInferenceRunner(), python_executable="python")
    job = logic.start(volume_node, tmp_path)
    assert job.poll()

    slicer_scene.RemoveNode(volume_node)

    with pytest.raises(InferenceError, match="was removed from the scene"):
        logic.finish(job)
    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert not job.temp_dir.exists()


@pytest.mark.parametrize("keep", [False, True], ids=["replace", "keep"])
def test_new_run_replaces_earlier_results(oblique_ct, tmp_path, keep):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    scene = oblique_ct.GetScene()
    logic = DAGMaNLogic(runner=FakeInferenceRunner(), python_executable="python-for-test", keep_previous_results=keep)

    first = logic.run(oblique_ct, model_dir, device="cpu")
    logic.runner = FakeInferenceRunner()
    second = logic.run(oblique_ct, model_dir, device="cpu")

    segmentations = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    assert second.segmentation_node in segmentations
    assert second.attention_node.GetScene() is scene
    assert (first.segmentation_node in segmentations) is keep
    assert (first.attention_node.GetScene() is scene) is keep
    assert oblique_ct.GetScene() is scene


def test_memory_report_on_cpu(oblique_ct, tiny_model_bundle):
    summary, warning = DAGMaNLogic().memory_report(oblique_ct, tiny_model_bundle, device="cpu")

    assert summary.startswith("Peak memory about ")
    assert " on cpu; " in summary
    assert warning == ""


def test_memory_report_warns_when_gpu_is_full(oblique_ct, tiny_model_bundle):
    from DAGMaNLib.environment import CudaDevice, TorchProbe

    nearly_full = CudaDevice(index=0, name="NVIDIA test GPU", total_bytes=16 * 2**30, free_bytes=10 * 2**20)
    probe = TorchProbe("python", torch_version="2.13.0", cuda_version="12.8", cuda_available=True, devices=(nearly_full,))

    summary, warning = DAGMaNLogic().memory_report(oblique_ct, tiny_model_bundle, device="auto", probe=probe)

    assert "of GPU memory on cuda:0" in summary
    assert summary.endswith("; 0.1 GiB available")
    assert "GPU memory on cuda:0" in warning
    assert "Choose the CPU" in warning


def test_memory_report_without_model_json(oblique_ct, tmp_path):
    summary, warning = DAGMaNLogic().memory_report(oblique_ct, tmp_path, device="cpu")

    assert summary == ""
    assert warning.startswith("No memory estimate: ")
    assert "model.json" in warning


def test_lesion_point_passed_to_child(oblique_ct, tmp_path):
    scene = oblique_ct.GetScene()
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule")
    points.AddControlPointWorld(-12.5, 30.25, 4.0)
    model_dir = fake_model_dir(tmp_path / "model", "classification")
    runner = FakeInferenceRunner()

    DAGMaNLogic(runner=runner, python_executable="python-for-test").run(oblique_ct, model_dir, device="cpu", point_node=points)

    command = runner.commands[0]
    assert command[-1] == "--point=-12.5,30.25,4.0"


def test_empty_point_list_rejected(oblique_ct, tmp_path):
    points = oblique_ct.GetScene().AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Empty")
    runner = FakeInferenceRunner()

    model_dir = fake_model_dir(tmp_path / "model", "classification")

    with pytest.raises(ValueError, match="'Empty' has no points; place a point on the lesion"):
        DAGMaNLogic(runner=runner).start(oblique_ct, model_dir, device="cpu", point_node=points)

    assert runner.commands == []


def test_point_and_mask_together_rejected(oblique_ct, tmp_path):
    scene = oblique_ct.GetScene()
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule")
    points.AddControlPointWorld(0.0, 0.0, 0.0)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Nodule mask")

    model_dir = fake_model_dir(tmp_path / "model", "classification")

    with pytest.raises(ValueError, match="lesion point or a lesion mask, not both"):
        DAGMaNLogic(runner=FakeInferenceRunner()).start(
            oblique_ct, model_dir, device="cpu", point_node=points, mask_node=segmentation
        )


def test_empty_lesion_mask_rejected(oblique_ct, tmp_path):
    segmentation = oblique_ct.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode", "Unpainted")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.GetSegmentation().AddEmptySegment("nodule")
    runner = FakeInferenceRunner()
    nodes_before = oblique_ct.GetScene().GetNumberOfNodes()

    model_dir = fake_model_dir(tmp_path / "model", "classification")

    with pytest.raises(ValueError, match="'Unpainted' has no voxels; paint the lesion first"):
        DAGMaNLogic(runner=runner).start(oblique_ct, model_dir, device="cpu", mask_node=segmentation)

    assert runner.commands == []
    assert oblique_ct.GetScene().GetNumberOfNodes() == nodes_before


def test_lesion_inputs_ignored_for_segmentation(oblique_ct, tmp_path):
    scene = oblique_ct.GetScene()
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Nodule")
    points.AddControlPointWorld(-12.5, 30.25, 4.0)
    model_dir = fake_model_dir(tmp_path / "model", "segmentation")
    runner = FakeInferenceRunner()

    outputs = DAGMaNLogic(runner=runner).run(oblique_ct, model_dir, device="cpu", point_node=points)

    assert not any(argument.startswith("--point") for argument in runner.commands[0])
    assert outputs.segmentation_node is not None


class DamagedOutputRunner(FakeInferenceRunner):
    """Writes the fake's outputs, then cuts ``attention.nrrd`` short, as a full disk would."""

    def start(self, command, env=None):
        child = super().start(command, env)
        attention = Path(command[command.index("--output") + 1]) / "attention.nrrd"
        attention.write_bytes(attention.read_bytes()[:300])
        return child


def test_unreadable_output_fails_without_nodes(oblique_ct, tmp_path):
    scene = oblique_ct.GetScene()
    counts_before = {name: scene.GetNumberOfNodesByClass(name) for name in ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode")}
    model_dir = fake_model_dir(tmp_path / "model", "segmentation")

    with pytest.raises(InferenceError, match="Loading the results of the inference failed"):
        DAGMaNLogic(runner=DamagedOutputRunner()).run(oblique_ct, model_dir, device="cpu")

    for name, count in counts_before.items():
        assert scene.GetNumberOfNodesByClass(name) == count
