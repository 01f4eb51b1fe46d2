"""Export a fine-tuning run folder as a model bundle that ``dagman infer`` and the Slicer module load."""

from __future__ import annotations

import json
from pathlib import Path

from dagman_core.bundle import write_bundle

from .classify import load_classifier
from .finetune import load_finetuned


def export_run(run_dir: str | Path, output_dir: str | Path, name: str | None = None) -> Path:
    """Write the bundle of fine-tuning run ``run_dir`` into ``output_dir`` (replaced only once complete)."""
    run_dir = Path(run_dir)
    info_path = run_dir / "finetune.json"
    if info_path.exists() and json.loads(info_path.read_text(encoding="utf-8")).get("task") == "classification":
        return _export_classifier(run_dir, Path(output_dir), name)
    model, info = load_finetuned(run_dir)
    labels = {int(value): label for value, label in info["labels"].items()}
    training = dict(info.get("training_data", {}))
    training["steps"] = info.get("steps")
    return write_bundle(
        output_dir,
        model,
        labels=labels,
        name=name or f"DAGMaN {model.config.name} {' / '.join(labels.values())} segmentation",
        training_data=training,
        extra_provenance={"finetune_run": str(run_dir.resolve()), "pretrained_run": info.get("pretrained_run")},
    )


def _export_classifier(run_dir: Path, output_dir: Path, name: str | None) -> Path:
    model, info = load_classifier(run_dir)
    labels = {int(value): label for value, label in info["labels"].items()}
    training = dict(info.get("training_data", {}))
    training.update(steps=info.get("steps"), mode=info.get("mode"), cross_validation=info.get("cross_validation"))
    return write_bundle(
        output_dir,
        model,
        labels=labels,
        name=name or f"DAGMaN {model.config.name} {' / '.join(labels.values())} classification",
        training_data=training,
        extra_provenance={"finetune_run": str(run_dir.resolve()), "pretrained_run": info.get("pretrained_run")},
        task="classification",
        crop_mode=info.get("crop", {}).get("mode", "auto"),
    )
