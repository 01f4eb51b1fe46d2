"""Model bundles: weights without pickle (safetensors) plus ``model.json`` describing how to run them.

``model.json`` carries the architecture (the full configuration) and the preprocessing the network
was trained with (orientation, spacing, HU window, crop size). It also carries the task, the labels
with their terminology codes and the provenance (version, date, training data summary, sha256 of the
weights). Inference therefore reproduces training preprocessing exactly.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .config import DAGMaNConfig, config_from_dict, load_config
from .data.io import current_umask
from .models.classification import CLASSIFIERS, DAGMaNClassifier
from .models.segmentation import SEGMENTERS, build_segmenter
from .terminology import describe_label

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
MODEL_JSON = "model.json"
TASKS = ("segmentation", "classification")
ARCHITECTURES = {**SEGMENTERS, **CLASSIFIERS}


class BundleError(ValueError):
    """A model folder that is missing, incomplete or fails its checksum."""


def sha256_of(path: str | os.PathLike) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocessing_of(config: DAGMaNConfig, task: str = "segmentation", crop_mode: str = "auto") -> dict:
    """Return the preprocessing section of ``model.json`` for a model of ``task`` built from ``config``.

    A segmentation model slides windows of ``finetune.crop_size`` over the body. A classification
    model classifies one crop of ``data.crop_size`` centred by ``crop_mode`` (``auto``, ``mask``, ``point``
    or ``whole``).
    """
    if task == "classification":
        crop = config.data.crop_size
        return {
            "orientation": "RAS",
            "spacing_mm": [config.data.spacing_mm] * 3,
            "hu_window": list(config.data.hu_window),
            "crop_size": [crop, crop, crop],
            "crop_mode": crop_mode,
        }
    crop = config.finetune.crop_size
    return {
        "orientation": "RAS",
        "spacing_mm": [config.data.spacing_mm] * 3,
        "hu_window": list(config.data.hu_window),
        "crop_size": [crop, crop, crop],
        "sliding_window_overlap": 0.5,
        "sliding_window_blend": "gaussian",
    }


def write_bundle(
    output_dir: str | os.PathLike,
    model: torch.nn.Module,
    labels: dict[int, str],
    name: str,
    training_data: dict,
    extra_provenance: dict | None = None,
    task: str = "segmentation",
    crop_mode: str = "auto",
) -> Path:
    """Write ``model`` and its ``model.json`` into ``output_dir``, replacing it only once complete.

    An existing ``output_dir`` is replaced only when it is empty or an earlier bundle. Segmentation
    labels leave out the background (0); classification keeps every class.
    """
    if task not in TASKS:
        raise BundleError(f"invalid task {task!r}; valid choices: {', '.join(TASKS)}")
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / MODEL_JSON).exists():
        raise BundleError(
            f"output folder {output_dir} is not empty and is not a model bundle; choose a new or empty folder"
        )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        weights_path = staging / WEIGHTS_FILE
        state = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
        save_file(state, str(weights_path), metadata={"format": "pt"})
        os.chmod(weights_path, 0o666 & ~current_umask())

        config = model.config
        architecture = {"type": model.architecture, "num_classes": model.num_classes, "config": config.to_dict()}
        if task == "classification":
            architecture["pooling"] = model.pooling
        description = {
            "format_version": BUNDLE_FORMAT,
            "name": name,
            "task": task,
            "architecture": architecture,
            "preprocessing": preprocessing_of(config, task, crop_mode),
            "labels": [
                describe_label(value, label) for value, label in sorted(labels.items()) if value != 0 or task == "classification"
            ],
            "weights": {"file": WEIGHTS_FILE, "sha256": sha256_of(weights_path), "format": "safetensors"},
            "provenance": {
                "dagman_version": __version__,
                "torch_version": torch.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "training_data": training_data,
                **(extra_provenance or {}),
            },
        }
        (staging / MODEL_JSON).write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")

        # mkdtemp creates the folder readable by its owner only; a bundle is meant to be shared.
        os.chmod(staging, 0o777 & ~current_umask())
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


def read_model_json(model_dir: str | os.PathLike) -> dict:
    """Read and check ``model.json`` of a bundle folder."""
    model_dir = Path(model_dir)
    description_path = model_dir / MODEL_JSON
    if not description_path.exists():
        raise BundleError(f"not a DAGMaN model folder: {description_path} is missing (create one with 'dagman export')")
    description = json.loads(description_path.read_text(encoding="utf-8"))
    if description.get("format_version") != BUNDLE_FORMAT:
        raise BundleError(
            f"model folder {model_dir} has bundle format {description.get('format_version')!r}; "
            f"this version of DAGMaN reads format {BUNDLE_FORMAT}"
        )
    return description


def load_bundle(model_dir: str | os.PathLike, device: str | torch.device = "cpu", verify: bool = True):
    """Load a segmentation or classification bundle; return ``(model, description)`` with the model in eval mode.

    Raises:
        BundleError: ``model.json`` or the weights are missing, or the weights' sha256 differs from
            the one recorded (a corrupt or replaced file).
    """
    model_dir = Path(model_dir)
    description = read_model_json(model_dir)
    weights_path = model_dir / description["weights"]["file"]
    if not weights_path.exists():
        raise BundleError(f"weights file missing from model folder: {weights_path}")
    if verify:
        actual = sha256_of(weights_path)
        expected = description["weights"]["sha256"]
        if actual != expected:
            raise BundleError(f"checksum mismatch for {weights_path}: sha256 {actual}, model.json records {expected}")

    architecture = description["architecture"]
    network = ARCHITECTURES.get(architecture.get("type"))
    if network is None:
        raise BundleError(
            f"unsupported architecture {architecture.get('type')!r} in {model_dir / MODEL_JSON}; "
            f"this version reads {sorted(ARCHITECTURES)}"
        )
    config = config_from_dict(architecture["config"])
    if architecture["type"] in CLASSIFIERS:
        model = network(config, num_classes=int(architecture["num_classes"]), pooling=architecture.get("pooling", "cls"))
    else:
        model = network(config, num_classes=int(architecture["num_classes"]))
    model.load_state_dict(load_file(str(weights_path), device="cpu"))
    return model.to(device).eval(), description


def write_random_bundle(
    output_dir: str | os.PathLike, preset: str = "tiny_cpu", seed: int = 0, task: str = "segmentation"
) -> Path:
    """Write an untrained (randomly initialised, seeded) bundle: a real model for self-tests.

    A segmentation bundle segments "Lung tumor"; a classification bundle classifies a crop of
    the whole body as "benign" or "malignant".
    """
    if task not in TASKS:
        raise BundleError(f"invalid task {task!r}; valid choices: {', '.join(TASKS)}")
    config = load_config(preset)
    torch.manual_seed(seed)
    training_data = {"cases": 0, "note": "random weights for testing the pipeline; not a trained model"}
    if task == "classification":
        return write_bundle(
            output_dir, DAGMaNClassifier(config, num_classes=2), labels={0: "benign", 1: "malignant"},
            name=f"untrained {preset} classifier (self-test)", training_data=training_data, task=task,
        )
    model = build_segmenter(config, num_classes=2)
    return write_bundle(
        output_dir,
        model,
        labels={1: "Lung tumor"},
        name=f"untrained {preset} (self-test)",
        training_data=training_data,
    )
