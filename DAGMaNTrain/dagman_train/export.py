"""Export a fine-tuning run folder as a model bundle that ``dagman infer`` and the Slicer module load."""

from __future__ import annotations

from pathlib import Path

from dagman_core.bundle import write_bundle

from .finetune import load_finetuned


def export_run(run_dir: str | Path, output_dir: str | Path, name: str | None = None) -> Path:
    """Write the bundle of fine-tuning run ``run_dir`` into ``output_dir`` (replaced only once complete)."""
    run_dir = Path(run_dir)
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
