"""DAGMaNLogic with real child processes: a failing child, a cancelled child tree, and the real inference."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from slicer_fixtures import (  # noqa: F401 (slicer_scene* are fixtures)
    ijk_to_ras_array,
    oblique_directions,
    slicer_scene,
    slicer_scene_with_views,
)

import slicer  # noqa: E402
import slicer.util  # noqa: E402
from DAGMaNLib import DAGMaNLogic, InferenceCancelled, InferenceError, SubprocessRunner  # noqa: E402
from DAGMaNLib.outputs import ATTRIBUTE_LAYER, ATTRIBUTE_MODEL_NAME, ATTRIBUTE_MODEL_SHA256  # noqa: E402
from DAGMaNLib.synthetic import add_synthetic_ct_volume  # noqa: E402

REAL_INFERENCE_TIMEOUT_S = 900


class ScriptRunner(SubprocessRunner):
    """Starts ``python -c SCRIPT`` in place of the inference command, and records the command it replaced."""

    def __init__(self, script: str):
        self.script = textwrap.dedent(script)
        self.replaced_commands = []

    def start(self, command, env=None):
        self.replaced_commands.append(list(command))
        return super().start([sys.executable, "-c", self.script], env)


def result_node_counts(scene) -> dict[str, int]:
    return {
        class_name: scene.GetNumberOfNodesByClass(class_name)
        for class_name in ("vtkMRMLSegmentationNode", "vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode")
    }


def process_is_gone(pid: int) -> bool:
    """Return whether ``pid`` has exited. A zombie waiting to be reaped by its new parent counts as exited."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def small_ct(slicer_scene):
    return add_synthetic_ct_volume(slicer_scene, shape_kji=(6, 10, 12))


FAILING_WITH_ERROR_LINE = """
    import json, sys
    print(json.dumps({"stage": "load", "fraction": 0.1, "message": "Loading model"}), flush=True)
    print("some library chatter", flush=True)
    message = "Model bundle is missing weights.safetensors; re-export the model"
    print(json.dumps({"stage": "error", "fraction": 1.0, "message": message}), flush=True)
    print(message, file=sys.stderr, flush=True)
    sys.exit(3)
"""

CRASHING_WITH_TRACEBACK = """
    import json
    print(json.dumps({"stage": "load", "fraction": 0.1, "message": "Loading model"}), flush=True)
    def load():
        raise RuntimeError("CUDA error: out of memory while allocating 2.0 GiB")
    load()
"""


@pytest.mark.parametrize(
    "script, expected_message, expected_returncode",
    [
        (FAILING_WITH_ERROR_LINE, "Model bundle is missing weights.safetensors; re-export the model", 3),
        (CRASHING_WITH_TRACEBACK, "RuntimeError: CUDA error: out of memory while allocating 2.0 GiB", 1),
    ],
    ids=["error line", "traceback"],
)
def test_failed_child_reports_message(
    slicer_scene, small_ct, tmp_path, script, expected_message, expected_returncode
):
    before = result_node_counts(slicer_scene)
    runner = ScriptRunner(script)
    logic = DAGMaNLogic(runner=runner)

    with pytest.raises(InferenceError) as raised:
        logic.run(small_ct, tmp_path, device="cpu", timeout_s=60)

    error = raised.value
    assert expected_message in str(error)
    assert "Traceback" not in str(error)
    assert error.child_message == expected_message
    assert error.returncode == expected_returncode
    assert result_node_counts(slicer_scene) == before
    output_dir = Path(runner.replaced_commands[0][runner.replaced_commands[0].index("--output") + 1])
    assert not output_dir.parent.exists()
    assert logic.job is None


def test_successful_child_without_result_fails(slicer_scene, small_ct, tmp_path):
    runner = ScriptRunner('print(\'{"stage": "done", "fraction": 1.0, "message": "ok"}\')')

    with pytest.raises(InferenceError, match="wrote no result.json"):
        DAGMaNLogic(runner=runner).run(small_ct, tmp_path, timeout_s=60)

    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_timeout_kills_child(slicer_scene, small_ct, tmp_path):
    runner = ScriptRunner("import time; time.sleep(60)")
    started = time.monotonic()

    with pytest.raises(InferenceError, match="did not finish within 1 s"):
        DAGMaNLogic(runner=runner).run(small_ct, tmp_path, timeout_s=1)

    assert time.monotonic() - started < 20


CHILD_WITH_GRANDCHILD = """
    import json, subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    print(json.dumps({"stage": "load", "fraction": 0.05, "message": "Loading model"}), flush=True)
    print(json.dumps({"stage": "spawned", "fraction": 0.1, "message": str(grandchild.pid)}), flush=True)
    time.sleep(120)
"""


def test_cancel_kills_process_tree(slicer_scene, small_ct, tmp_path):
    before = result_node_counts(slicer_scene)
    logic = DAGMaNLogic(runner=ScriptRunner(CHILD_WITH_GRANDCHILD))
    pids = []

    def on_progress(fraction, message):
        if message.isdigit():
            pids.extend([logic.job.child.pid, int(message)])
            assert psutil.pid_exists(pids[0])
            assert psutil.pid_exists(pids[1])
            logic.cancel()

    started = time.monotonic()
    with pytest.raises(InferenceCancelled):
        logic.run(small_ct, tmp_path, progress_callback=on_progress, timeout_s=60)

    assert time.monotonic() - started < 30
    assert len(pids) == 2
    deadline = time.monotonic() + 5
    while not all(process_is_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        assert process_is_gone(pid), f"process {pid} still runs after cancel"
    assert result_node_counts(slicer_scene) == before
    assert logic.job is None


def test_abandon_kills_child_and_cleans_up(slicer_scene, small_ct, tmp_path):
    before = result_node_counts(slicer_scene)
    logic = DAGMaNLogic(runner=ScriptRunner(CHILD_WITH_GRANDCHILD))
    job = logic.start(small_ct, tmp_path, device="cpu")
    deadline = time.monotonic() + 30
    while (job.last_event is None or job.last_event.stage != "spawned") and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.05)
    pids = [job.child.pid, int(job.last_event.message)]

    logic.abandon()

    deadline = time.monotonic() + 5
    while not all(process_is_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        assert process_is_gone(pid), f"process {pid} still runs after abandon"
    assert not job.temp_dir.exists()
    assert logic.job is None
    assert result_node_counts(slicer_scene) == before


def test_start_poll_finish_api(slicer_scene, small_ct, tmp_path):
    logic = DAGMaNLogic(runner=ScriptRunner(CHILD_WITH_GRANDCHILD))
    job = logic.start(small_ct, tmp_path, device="cpu")
    temp_dir = job.temp_dir

    assert job.poll() is False
    with pytest.raises(RuntimeError, match="already running"):
        logic.start(small_ct, tmp_path)
    with pytest.raises(RuntimeError, match="still running"):
        logic.finish(job)
    logic.cancel()
    deadline = time.monotonic() + 10
    while not job.poll() and time.monotonic() < deadline:
        time.sleep(0.05)

    assert job.state.value == "cancelled"
    with pytest.raises(InferenceCancelled):
        logic.finish(job)
    assert not temp_dir.exists()


def test_callback_error_stops_child(slicer_scene, small_ct, tmp_path):
    logic = DAGMaNLogic(runner=ScriptRunner(CHILD_WITH_GRANDCHILD))
    pids = []

    def failing_callback(fraction, message):
        if message == "Loading model":
            pids.append(logic.job.child.pid)
            raise KeyError("callback bug")

    with pytest.raises(KeyError, match="callback bug"):
        logic.run(small_ct, tmp_path, progress_callback=failing_callback, timeout_s=60)

    assert logic.job is None
    assert len(pids) == 1
    assert process_is_gone(pids[0])


def test_real_inference_tiny_model(slicer_scene_with_views, tiny_model_bundle):
    scene = slicer_scene_with_views
    volume_node = add_synthetic_ct_volume(
        scene,
        name="Tiny CT",
        shape_kji=(20, 40, 44),
        spacing_mm=(1.6, 1.5, 3.0),
        origin_ras_mm=(-30.0, 12.0, -25.0),
        directions=oblique_directions(0.1, 0.05),
    )
    progress = []
    logic = DAGMaNLogic()

    outputs = logic.run(
        volume_node,
        tiny_model_bundle,
        device="cpu",
        progress_callback=lambda fraction, message: progress.append((fraction, message)),
        timeout_s=REAL_INFERENCE_TIMEOUT_S,
    )

    assert progress[-1] == (1.0, "Done")
    assert len(progress) >= 3

    segmentation = outputs.segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == len(outputs.result.labels)
    for label in outputs.result.labels:
        segment_id = segmentation.GetSegmentIdBySegmentName(label.name)
        assert segment_id != ""
        assert np.allclose(segmentation.GetSegment(segment_id).GetColor(), label.color, atol=1e-6)
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "exported")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportAllSegmentsToLabelmapNode(
        outputs.segmentation_node, labelmap_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    assert np.allclose(ijk_to_ras_array(labelmap_node), ijk_to_ras_array(volume_node), atol=1e-4)

    attention = outputs.attention_node
    voxels = slicer.util.arrayFromVolume(attention)
    assert np.allclose(ijk_to_ras_array(attention), ijk_to_ras_array(volume_node), atol=1e-4)
    assert attention.GetImageData().GetDimensions() == volume_node.GetImageData().GetDimensions()
    assert voxels.dtype == np.float32
    assert np.isfinite(voxels).all()
    assert voxels.min() >= 0.0
    assert voxels.max() <= 1.0

    assert len(outputs.result.model_sha256) == 64
    for node, layer in ((outputs.segmentation_node, "segmentation"), (attention, "attention")):
        assert node.GetAttribute(ATTRIBUTE_MODEL_NAME) == outputs.result.model_name
        assert node.GetAttribute(ATTRIBUTE_MODEL_SHA256) == outputs.result.model_sha256
        assert node.GetAttribute(ATTRIBUTE_LAYER) == layer
    composite_node = scene.GetNthNodeByClass(0, "vtkMRMLSliceCompositeNode")
    assert composite_node.GetForegroundVolumeID() == attention.GetID()


def test_real_classification_tiny_model(slicer_scene_with_views, tmp_path):
    from dagman_core.bundle import write_random_bundle
    from DAGMaNLib.outputs import ATTRIBUTE_PREDICTED_CLASS, ATTRIBUTE_PROBABILITY_PREFIX

    bundle = write_random_bundle(tmp_path / "classifier", task="classification")
    scene = slicer_scene_with_views
    volume_node = add_synthetic_ct_volume(
        scene, name="Tiny CT", shape_kji=(20, 40, 44), spacing_mm=(1.6, 1.5, 3.0),
        origin_ras_mm=(-30.0, 12.0, -25.0), directions=oblique_directions(0.1, 0.05),
    )
    segmentations_before = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    outputs = DAGMaNLogic().run(volume_node, bundle, device="cpu", timeout_s=REAL_INFERENCE_TIMEOUT_S)

    assert outputs.segmentation_node is None
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations_before
    table = outputs.table_node.GetTable()
    assert [table.GetColumn(index).GetName() for index in range(3)] == ["Model", "Class", "Probability"]
    assert table.GetNumberOfRows() == 2
    rows = {table.GetValue(row, 1).ToString(): table.GetValue(row, 2).ToDouble() for row in range(2)}
    assert rows == pytest.approx(outputs.result.probabilities, abs=1e-9)
    assert sum(rows.values()) == pytest.approx(1.0, abs=1e-5)
    assert table.GetValue(0, 0).ToString() == "untrained tiny_cpu classifier (self-test)"
    for node, layer in ((outputs.table_node, "classification"), (outputs.attention_node, "attention")):
        assert node.GetAttribute(ATTRIBUTE_LAYER) == layer
        assert node.GetAttribute(ATTRIBUTE_PREDICTED_CLASS) == outputs.result.predicted
        for name, probability in rows.items():
            assert float(node.GetAttribute(f"{ATTRIBUTE_PROBABILITY_PREFIX}{name}")) == pytest.approx(probability, abs=1e-6)
    assert outputs.result.predicted in outputs.summary

    attention = outputs.attention_node
    voxels = slicer.util.arrayFromVolume(attention)
    assert np.allclose(ijk_to_ras_array(attention), ijk_to_ras_array(volume_node), atol=1e-4)
    assert voxels.min() >= 0.0
    assert voxels.max() <= 1.0
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    volume_parent = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume_node))
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(outputs.table_node)) == volume_parent


def test_module_self_test_passes(slicer_scene, monkeypatch):
    """Run the module's own self-test (DAGMaNTest) against slicer-core, as "Reload and Test" runs it in Slicer.

    Only the Qt layer is replaced: ``qt`` and ``slicer.ScriptedLoadableModule`` exist solely in
    the Slicer application. The scene, the catalogue and both real inference runs are the real ones.
    """
    import importlib.util
    import types
    import unittest

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    scripted.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {})
    scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)

    module_path = Path(__file__).resolve().parents[1] / "DAGMaN" / "DAGMaN.py"
    spec = importlib.util.spec_from_file_location("DAGMaN_module_under_test", module_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    result = unittest.TestResult()
    module.DAGMaNTest("runTest").run(result)

    assert result.errors == []
    assert result.failures == []
    assert result.testsRun == 1
    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1


def test_real_classification_crop_on_lesion_point(slicer_scene, tmp_path):
    from dagman_core.bundle import write_random_bundle

    bundle = write_random_bundle(tmp_path / "classifier", task="classification")
    volume_node = add_synthetic_ct_volume(
        slicer_scene, name="Wide CT", shape_kji=(40, 120, 120), spacing_mm=(2.0, 2.0, 4.0), origin_ras_mm=(0.0, 0.0, 0.0)
    )
    point = (40.0, 40.0, 80.0)
    points = slicer_scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Lesion")
    points.AddControlPointWorld(*point)

    outputs = DAGMaNLogic().run(volume_node, bundle, device="cpu", timeout_s=REAL_INFERENCE_TIMEOUT_S, point_node=points)

    # The tiny_cpu classifier's crop is 64 voxels of 2 mm, a 128 mm cube around the point.
    attention = slicer.util.arrayFromVolume(outputs.attention_node)
    kji = np.argwhere(attention > 0)
    ijk = np.c_[kji[:, ::-1], np.ones(len(kji))]
    ras = (ijk_to_ras_array(outputs.attention_node) @ ijk.T).T[:, :3]
    assert len(kji) > 0
    assert np.abs(ras - np.array(point)).max() <= 64.0 + 4.0
    assert len(kji) < attention.size


def test_real_classification_crop_on_lesion_mask(slicer_scene, tmp_path):
    from dagman_core.bundle import write_random_bundle

    bundle = write_random_bundle(tmp_path / "classifier", task="classification")
    volume_node = add_synthetic_ct_volume(
        slicer_scene, name="Wide CT", shape_kji=(40, 120, 120), spacing_mm=(2.0, 2.0, 4.0), origin_ras_mm=(0.0, 0.0, 0.0),
        directions=oblique_directions(0.1, 0.05),
    )
    # A 10-voxel cube of lesion near the volume's last corner, as a painted segmentation.
    lesion = np.zeros((40, 120, 120), dtype=np.uint8)
    lesion[28:38, 100:110, 100:110] = 1
    labelmap = slicer_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lesion labelmap")
    labelmap.CopyOrientation(volume_node)
    slicer.util.updateVolumeFromArray(labelmap, lesion)
    segmentation = slicer_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Nodule")
    slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    slicer_scene.RemoveNode(labelmap)
    centre_ijk = np.array([104.5, 104.5, 32.5, 1.0])
    centre_ras = (ijk_to_ras_array(volume_node) @ centre_ijk)[:3]

    outputs = DAGMaNLogic().run(
        volume_node, bundle, device="cpu", timeout_s=REAL_INFERENCE_TIMEOUT_S, mask_node=segmentation
    )

    attention = slicer.util.arrayFromVolume(outputs.attention_node)
    kji = np.argwhere(attention > 0)
    ijk = np.c_[kji[:, ::-1], np.ones(len(kji))]
    ras = (ijk_to_ras_array(outputs.attention_node) @ ijk.T).T[:, :3]
    assert len(kji) > 0
    assert np.abs(ras - centre_ras).max() <= 64.0 + 6.0
    assert slicer_scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
