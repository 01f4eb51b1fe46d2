"""Reading and validation of ``result.json``, the summary that the inference child process writes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ResultFormatError

logger = logging.getLogger(__name__)

RESULT_FILE_NAME = "result.json"
MAX_LABEL_VALUE = 255  # segmentation.nrrd is uint8


@dataclass(frozen=True)
class LabelInfo:
    """One foreground label of ``segmentation.nrrd``.

    ``color`` is RGB in [0, 1]. ``terminology`` maps "category", "type" and optionally
    "region" (and the modifiers "typeModifier", "regionModifier") to
    ``{"scheme", "code", "meaning"}`` codes, or is ``None`` when the model gave none.
    """

    value: int
    name: str
    color: tuple[float, float, float]
    terminology: dict[str, Any] | None = None


@dataclass(frozen=True)
class InferenceResult:
    """The parsed ``result.json`` of one run, with output paths resolved against its folder."""

    task: str
    model_name: str
    model_sha256: str
    device: str
    timings_s: dict[str, float]
    labels: tuple[LabelInfo, ...]
    segmentation_path: Path | None
    attention_path: Path
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    probabilities: dict[str, float] = field(default_factory=dict)
    predicted: str | None = None


def read_result(output_dir: Path) -> InferenceResult:
    """Read and validate ``output_dir/result.json``; raise ``ResultFormatError`` naming the bad field."""
    path = Path(output_dir) / RESULT_FILE_NAME
    if not path.is_file():
        raise ResultFormatError(
            f"The inference process exited successfully but wrote no {RESULT_FILE_NAME} in {output_dir}; "
            "check that the dagman_core version matches this module"
        )
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultFormatError(f"{path} is not valid JSON: {error}") from error
    return parse_result(payload, Path(output_dir))


def parse_result(payload: Any, output_dir: Path) -> InferenceResult:
    """Validate a decoded ``result.json`` and resolve its output file names against ``output_dir``."""
    if not isinstance(payload, dict):
        raise ResultFormatError(f"{RESULT_FILE_NAME} must contain a JSON object, got {type(payload).__name__}")

    model = payload.get("model")
    if not isinstance(model, dict):
        raise ResultFormatError(f"{RESULT_FILE_NAME}: 'model' must be an object with 'name' and 'sha256'")
    model_name = _require_string(model, "name", "model.name")
    model_sha256 = _require_string(model, "sha256", "model.sha256")

    task = str(payload.get("task", "segmentation"))
    classification = task == "classification"
    outputs = payload.get("outputs")
    if not isinstance(outputs, dict):
        raise ResultFormatError(f"{RESULT_FILE_NAME}: 'outputs' must be an object with 'segmentation' and 'attention'")
    segmentation_path = None
    if not classification:
        segmentation_path = _resolve_output(output_dir, _require_string(outputs, "segmentation", "outputs.segmentation"))
    attention_path = _resolve_output(output_dir, _require_string(outputs, "attention", "outputs.attention"))

    labels_payload = payload.get("labels", [])
    if not isinstance(labels_payload, list):
        raise ResultFormatError(f"{RESULT_FILE_NAME}: 'labels' must be a list, got {type(labels_payload).__name__}")
    # Class 0 is a class of its own; in a segmentation, 0 is the background and never listed.
    lowest_value = 0 if classification else 1
    labels = tuple(_parse_label(item, index, lowest_value) for index, item in enumerate(labels_payload))
    values = [label.value for label in labels]
    duplicates = sorted({value for value in values if values.count(value) > 1})
    if duplicates:
        raise ResultFormatError(f"{RESULT_FILE_NAME}: label values {duplicates} are listed more than once")

    probabilities, predicted = {}, None
    if classification:
        probabilities = _parse_probabilities(payload.get("probabilities"), labels)
        predicted = max(probabilities, key=probabilities.get)

    timings = payload.get("timings_s", {})
    if not isinstance(timings, dict):
        timings = {}
    return InferenceResult(
        task=task,
        model_name=model_name,
        model_sha256=model_sha256,
        device=str(payload.get("device", "")),
        timings_s={str(key): float(value) for key, value in timings.items() if isinstance(value, (int, float))},
        labels=labels,
        segmentation_path=segmentation_path,
        attention_path=attention_path,
        raw=payload,
        probabilities=probabilities,
        predicted=predicted,
    )


def _parse_probabilities(payload: Any, labels: tuple[LabelInfo, ...]) -> dict[str, float]:
    """Check a classification result's ``probabilities``: one number in [0, 1] per listed class."""
    names = [label.name for label in labels]
    if not isinstance(payload, dict) or sorted(payload) != sorted(names):
        raise ResultFormatError(f"{RESULT_FILE_NAME}: 'probabilities' must map each class {names} to a number")
    probabilities = {}
    for name in names:
        value = payload[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ResultFormatError(f"{RESULT_FILE_NAME}: probability of {name!r} is {value!r}; it must lie in [0, 1]")
        probabilities[name] = float(value)
    return probabilities


def _parse_label(item: Any, index: int, lowest_value: int = 1) -> LabelInfo:
    where = f"labels[{index}]"
    if not isinstance(item, dict):
        raise ResultFormatError(f"{RESULT_FILE_NAME}: {where} must be an object, got {item!r}")

    value = item.get("value")
    if isinstance(value, bool) or not isinstance(value, int) or not lowest_value <= value <= MAX_LABEL_VALUE:
        raise ResultFormatError(
            f"{RESULT_FILE_NAME}: {where}.value {value!r} is invalid; label values are integers in {lowest_value}..{MAX_LABEL_VALUE}"
        )
    name = _require_string(item, "name", f"{where}.name")

    color = item.get("color")
    if (
        not isinstance(color, (list, tuple))
        or len(color) != 3
        or not all(isinstance(channel, (int, float)) and 0.0 <= channel <= 1.0 for channel in color)
    ):
        raise ResultFormatError(f"{RESULT_FILE_NAME}: {where}.color {color!r} must be 3 numbers in [0, 1] (RGB)")

    terminology = item.get("terminology")
    if terminology is not None and not isinstance(terminology, dict):
        raise ResultFormatError(f"{RESULT_FILE_NAME}: {where}.terminology must be an object, got {terminology!r}")
    return LabelInfo(value=value, name=name, color=tuple(float(channel) for channel in color), terminology=terminology)


def _require_string(mapping: dict, key: str, where: str) -> str:
    value = mapping.get(key)
    if not isinstance(value, str) or not value:
        raise ResultFormatError(f"{RESULT_FILE_NAME}: '{where}' must be a non-empty string, got {value!r}")
    return value


def _resolve_output(output_dir: Path, name: str) -> Path:
    """Resolve an output file name, which must stay inside ``output_dir`` and exist."""
    root = Path(output_dir).resolve()
    path = (root / name).resolve()
    if root not in path.parents:
        raise ResultFormatError(f"{RESULT_FILE_NAME}: output file {name!r} is outside the output folder {root}")
    if not path.is_file():
        raise ResultFormatError(f"{RESULT_FILE_NAME} lists output file {name!r}, but {path} does not exist")
    return path
