"""DAGMaNLib helpers that need no scene: progress lines, terminology strings, result.json, command, dependencies."""

from __future__ import annotations

import json
import os

import pytest

import slicer_fixtures  # noqa: F401 (puts the module folders on sys.path)

import slicer  # noqa: E402
from DAGMaNLib.command import CORE_PARENT_DIR, build_child_environment, build_inference_command  # noqa: E402
from DAGMaNLib.dependencies import missing_requirements, torch_installed  # noqa: E402
from DAGMaNLib.errors import ResultFormatError  # noqa: E402
from DAGMaNLib.progress import ProgressEvent, parse_progress_line  # noqa: E402
from DAGMaNLib.results import parse_result  # noqa: E402
from DAGMaNLib.runner import kill_process_tree  # noqa: E402
from DAGMaNLib.terminology import serialize_terminology  # noqa: E402

TUMOR_TERMINOLOGY = {
    "category": {"scheme": "SCT", "code": "49755003", "meaning": "Morphologically Altered Structure"},
    "type": {"scheme": "SCT", "code": "108369006", "meaning": "Neoplasm"},
    "region": {"scheme": "SCT", "code": "39607008", "meaning": "Lung"},
}


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"stage": "infer", "fraction": 0.5, "message": "window 2 of 4"}', ProgressEvent("infer", 0.5, "window 2 of 4")),
        ('  {"stage": "load", "fraction": 0}  ', ProgressEvent("load", 0.0, "")),
        ('{"stage": "x", "fraction": 1.7, "message": "m"}', ProgressEvent("x", 1.0, "m")),
        ('{"stage": "x", "fraction": -0.2, "message": "m"}', ProgressEvent("x", 0.0, "m")),
        ('{"stage": "error", "fraction": 1.0, "message": "boom"}', ProgressEvent("error", 1.0, "boom")),
        ("Loading weights...", None),
        ('{"stage": "x", "fraction": "half"}', None),
        ('{"fraction": 0.5}', None),
        ('{"stage": "x", "fraction": true}', None),
        ("[1, 2]", None),
        ("{not json", None),
        ("", None),
    ],
)
def test_parse_progress_line(line, expected):
    assert parse_progress_line(line) == expected


def test_error_event_flag():
    assert parse_progress_line('{"stage": "error", "fraction": 1.0, "message": "x"}').is_error
    assert not parse_progress_line('{"stage": "done", "fraction": 1.0, "message": "x"}').is_error


def test_terminology_round_trip_through_slicer():
    serialized = serialize_terminology(TUMOR_TERMINOLOGY)
    entry = slicer.vtkSlicerTerminologyEntry()

    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(serialized, entry)
    assert entry.GetTerminologyContextName() == "Segmentation category and type - DICOM master list"
    assert entry.GetCategoryObject().GetCodeMeaning() == "Morphologically Altered Structure"
    assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
    assert entry.GetTypeObject().GetCodeValue() == "108369006"
    assert entry.GetRegionObject().GetCodeMeaning() == "Lung"


def test_terminology_matches_slicer_serializer():
    expected = slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        "Segmentation category and type - DICOM master list",
        "49755003", "SCT", "Morphologically Altered Structure",
        "108369006", "SCT", "Neoplasm",
        "", "", "",
        "Anatomic codes - DICOM master list",
        "39607008", "SCT", "Lung",
        "", "", "",
    )  # fmt: skip

    assert serialize_terminology(TUMOR_TERMINOLOGY) == expected


@pytest.mark.parametrize(
    "terminology, message",
    [
        ({"type": TUMOR_TERMINOLOGY["type"]}, "no 'category' code"),
        ({**TUMOR_TERMINOLOGY, "type": {"scheme": "SCT", "code": "", "meaning": "x"}}, "type.code must be"),
        ({**TUMOR_TERMINOLOGY, "region": {"scheme": "SCT", "code": "1", "meaning": "a~b"}}, "reserves as separators"),
        ({**TUMOR_TERMINOLOGY, "region": "Lung"}, "region must be an object"),
    ],
)
def test_terminology_invalid_rejected(terminology, message):
    with pytest.raises(ValueError, match=message):
        serialize_terminology(terminology)


def write_outputs(folder):
    (folder / "segmentation.nrrd").write_bytes(b"")
    (folder / "attention.nrrd").write_bytes(b"")


def valid_result():
    return {
        "task": "segmentation",
        "model": {"name": "m", "sha256": "0" * 64},
        "device": "cpu",
        "timings_s": {"total": 1.5},
        "labels": [{"value": 1, "name": "Lung tumor", "color": [0.86, 0.31, 0.24], "terminology": TUMOR_TERMINOLOGY}],
        "outputs": {"segmentation": "segmentation.nrrd", "attention": "attention.nrrd"},
    }


def test_parse_result_valid(tmp_path):
    write_outputs(tmp_path)

    result = parse_result(valid_result(), tmp_path)

    assert result.model_name == "m"
    assert result.labels[0].value == 1
    assert result.labels[0].color == (0.86, 0.31, 0.24)
    assert result.segmentation_path == (tmp_path / "segmentation.nrrd").resolve()
    assert result.timings_s == {"total": 1.5}


def classification_result():
    return {
        "task": "classification",
        "model": {"name": "nodules", "sha256": "1" * 64},
        "device": "cpu",
        "labels": [
            {"value": 0, "name": "benign", "color": [0.2, 0.6, 0.3]},
            {"value": 1, "name": "malignant", "color": [0.9, 0.2, 0.2]},
        ],
        "probabilities": {"benign": 0.25, "malignant": 0.75},
        "outputs": {"attention": "attention.nrrd"},
    }


def test_parse_classification_result(tmp_path):
    write_outputs(tmp_path)

    result = parse_result(classification_result(), tmp_path)

    assert result.task == "classification"
    assert result.segmentation_path is None
    assert [label.value for label in result.labels] == [0, 1]
    assert result.probabilities == {"benign": 0.25, "malignant": 0.75}
    assert result.predicted == "malignant"


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("probabilities"), "'probabilities' must map each class"),
        (lambda r: r["probabilities"].pop("benign"), "'probabilities' must map each class"),
        (lambda r: r["probabilities"].update(benign=1.5), "must lie in \\[0, 1\\]"),
        (lambda r: r["labels"][0].update(value=-1), "integers in 0..255"),
    ],
)
def test_parse_classification_result_invalid(tmp_path, change, message):
    write_outputs(tmp_path)
    result = classification_result()
    change(result)

    with pytest.raises(ResultFormatError, match=message):
        parse_result(result, tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("model"), "'model' must be an object"),
        (lambda r: r["model"].pop("sha256"), "model.sha256"),
        (lambda r: r["outputs"].update(attention="../escape.nrrd"), "outside the output folder"),
        (lambda r: r["outputs"].update(attention="missing.nrrd"), "does not exist"),
        (lambda r: r["labels"][0].update(value=0), "labels\\[0\\].value 0 is invalid"),
        (lambda r: r["labels"][0].update(value=300), "integers in 1..255"),
        (lambda r: r["labels"][0].update(color=[1, 0]), "must be 3 numbers"),
        (lambda r: r["labels"][0].update(color=[255, 0, 0]), "must be 3 numbers in \\[0, 1\\]"),
        (lambda r: r["labels"].append(dict(r["labels"][0])), "listed more than once"),
        (lambda r: r.update(labels={"1": "x"}), "'labels' must be a list"),
    ],
)
def test_parse_result_invalid(tmp_path, change, message):
    write_outputs(tmp_path)
    result = json.loads(json.dumps(valid_result()))
    change(result)

    with pytest.raises(ResultFormatError, match=message):
        parse_result(result, tmp_path)


def test_inference_command_contract(tmp_path):
    command = build_inference_command("py", tmp_path / "model", tmp_path / "in.nrrd", tmp_path / "out", "cuda")

    assert command == [
        "py", "-m", "dagman_core.inference",
        "--model", str(tmp_path / "model"),
        "--input", str(tmp_path / "in.nrrd"),
        "--output", str(tmp_path / "out"),
        "--device", "cuda",
        "--progress", "json",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="device 'gpu' is invalid"):
        build_inference_command("py", tmp_path, tmp_path, tmp_path, "gpu")


def test_child_environment_puts_core_first():
    environment = build_child_environment({"PYTHONPATH": "/elsewhere", "HOME": "/home/x"})

    assert environment["PYTHONPATH"].split(os.pathsep) == [str(CORE_PARENT_DIR), "/elsewhere"]
    assert (CORE_PARENT_DIR / "dagman_core").is_dir()
    assert environment["PYTHONUNBUFFERED"] == "1"
    assert environment["HOME"] == "/home/x"


def test_dependencies_detects_missing():
    assert missing_requirements({"json": "json", "no_such_module_dagman": "no-such-package>=1"}) == [
        "no-such-package>=1"
    ]
    assert missing_requirements() == []
    assert torch_installed()


def test_kill_process_tree_missing_pid():
    # A pid that cannot exist on Linux (above pid_max) is reported as nothing killed.
    assert kill_process_tree(2**31 - 2) == []
