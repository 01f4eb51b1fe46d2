"""``dagman demo``: the whole pipeline on two public chest CTs, from pretraining to an overlay picture.

It pretrains ``tiny_cpu`` on both scans, fine-tunes lung tumor segmentation on both, exports the
model, segments lung2 and reports the Dice against lung2's mask. lung2 is also a training case, so
the Dice shows that the pipeline works end to end, not how well the model generalises.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import SimpleITK as sitk

from dagman_core.config import load_config
from dagman_core.data.io import same_geometry
from dagman_core.inference.cli import BarProgress
from dagman_core.inference.pipeline import run_inference
from dagman_core.metrics import dice

from .demo_data import fetch_demo_data
from .export import export_run
from .finetune import finetune_segmentation
from .overlay import render_overlay
from .pretrain import pretrain
from .runs import atomic_write_text

logger = logging.getLogger(__name__)

DEMO_PRESET = "tiny_cpu"
DEMO_PRETRAIN_STEPS = 60
DEMO_FINETUNE_STEPS = 800
PHASES = 6


def _phase(number: int, title: str) -> None:
    logger.info("[%d/%d] %s", number, PHASES, title)


def run_demo(output_dir: str | Path, pretrain_steps: int | None = None, finetune_steps: int | None = None) -> dict:
    """Run the demo into ``output_dir``; return lung2's ``result.json`` with the Dice added.

    Writes ``data/datalist.json``, ``runs/pretrain/``, ``runs/finetune/``, ``model/`` and
    ``lung2/`` (``segmentation.nrrd``, ``attention.nrrd``, ``result.json``, ``overlay.png``).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    _phase(1, "obtaining two chest CTs with tumor masks (pyradiomics 3.0.1 source distribution)")
    data = fetch_demo_data()
    datalist = output_dir / "data" / "datalist.json"
    content = {
        "labels": {"0": "background", "1": "Lung tumor"},
        "training": [{"image": str(image), "label": str(label)} for image, label in data.cases()],
    }
    atomic_write_text(datalist, json.dumps(content, indent=2) + "\n")

    _phase(2, f"pretraining DAGMaN ({DEMO_PRESET}) on both scans")
    pretrain_dir = output_dir / "runs" / "pretrain"
    pretrain(load_config(DEMO_PRESET), datalist, pretrain_dir, max_steps=pretrain_steps or DEMO_PRETRAIN_STEPS)

    _phase(3, "fine-tuning lung tumor segmentation")
    finetune_dir = output_dir / "runs" / "finetune"
    finetune_segmentation(pretrain_dir, datalist, finetune_dir, max_steps=finetune_steps or DEMO_FINETUNE_STEPS)

    _phase(4, "exporting the model bundle")
    model_dir = export_run(finetune_dir, output_dir / "model", name="DAGMaN demo lung tumor segmentation (tiny_cpu)")

    _phase(5, "segmenting lung2 and mapping the model's attention")
    case_dir = output_dir / "lung2"
    result = run_inference(model_dir, data.lung2_image, case_dir, device="cpu", progress=BarProgress())

    _phase(6, "scoring against lung2's tumor mask and drawing the overlay")
    segmentation = sitk.ReadImage(str(case_dir / "segmentation.nrrd"))
    reference = sitk.ReadImage(str(data.lung2_label))
    if not same_geometry(segmentation, reference):
        raise RuntimeError("the segmentation does not share the lung2 mask's geometry; this is a bug in inference")
    score = dice(sitk.GetArrayFromImage(segmentation) == 1, sitk.GetArrayFromImage(reference) > 0)
    result["evaluation"] = {
        "reference": str(data.lung2_label),
        "dice": round(score, 4),
        "note": "lung2 is also a training case: this Dice shows the pipeline works, not how the model generalises",
    }
    atomic_write_text(case_dir / "result.json", json.dumps(result, indent=2) + "\n")
    render_overlay(
        data.lung2_image,
        case_dir / "segmentation.nrrd",
        case_dir / "attention.nrrd",
        case_dir / "overlay.png",
        reference_label_path=data.lung2_label,
        title=f"DAGMaN demo, lung2: Dice {score:.3f} against the tumor mask",
    )

    logger.info("demo finished in %.1f min; Dice on lung2 %.3f; results in %s", (time.perf_counter() - started) / 60, score, case_dir)
    return result
