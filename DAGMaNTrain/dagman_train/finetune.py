"""Segmentation fine-tuning: the pretrained DAGMaN encoder plus a U-Net decoder, all layers trained."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from monai.data import CacheDataset, DataLoader
from monai.losses import DiceCELoss
from monai.transforms import Compose
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from dagman_core.data.datalist import label_names, load_datalist
from dagman_core.data.transforms import segmentation_transforms
from dagman_core.models.segmentation import build_segmenter
from dagman_core.schedules import cosine_schedule

from .distributed import DistributedContext, setup_distributed
from .pretrain import ENCODER_FILE, parameter_groups
from .runs import MetricsLog, atomic_save_safetensors, atomic_write_text, json_safe, progress_bar, read_run_config, seed_everything, write_config

logger = logging.getLogger(__name__)

MODEL_FILE = "segmenter.safetensors"
RUN_INFO = "finetune.json"
DEFAULT_LABELS = {1: "Lung tumor"}


def finetune_segmentation(
    pretrained_run: str | Path,
    datalist: str | Path,
    output_dir: str | Path,
    max_steps: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    validate_every: int | None = None,
) -> dict:
    """Fine-tune a segmentation model from a pretraining run folder and write a fine-tuning run folder.

    The architecture and preprocessing come from the pretraining run's ``config.yaml``; the steps,
    crop size, batch size and learning rate from its ``finetune`` section. Label names come from the
    datalist's ``labels`` mapping (``{"1": "Lung tumor"}`` when it has none).

    Under torchrun each process draws its own crops and DistributedDataParallel averages the gradients,
    so a step uses ``finetune.batch_size`` crops per process. Rank 0 alone writes the run folder.

    When the datalist has a ``validation`` list, rank 0 segments those cases with the sliding-window
    inference of ``dagman infer`` after the last step (and every ``validate_every`` steps). Dice and
    HD95 per case go into ``validation.json`` and ``finetune.json``, and Dice per case into
    ``validation_dice.png``.

    Returns:
        The run summary written to ``finetune.json``.
    """
    context = setup_distributed(device)
    try:
        return _finetune(context, Path(pretrained_run), Path(datalist), Path(output_dir), max_steps, show_progress, validate_every)
    finally:
        context.close()


def _finetune(context: DistributedContext, pretrained_run: Path, datalist: Path, run_dir: Path, max_steps, show_progress,
              validate_every: int | None = None) -> dict:
    config = read_run_config(pretrained_run)
    encoder_path = pretrained_run / ENCODER_FILE
    if not encoder_path.exists():
        raise FileNotFoundError(f"pretrained encoder not found: {encoder_path}; run 'dagman pretrain' first")
    torch_device = context.device
    seed = config.train.seed + context.rank
    seed_everything(config.train.seed)
    settings = config.finetune

    # Data: crops centred on label and background voxels in equal numbers.
    cases = load_datalist(datalist, "training", require_labels=True)
    validation_cases = _validation_cases(datalist)
    names = label_names(datalist)
    if not names:
        names = dict(DEFAULT_LABELS)
        logger.warning("datalist %s has no 'labels' mapping; naming label 1 %r", datalist, DEFAULT_LABELS[1])
    names = {value: name for value, name in names.items() if value != 0}
    num_classes = max(names) + 1
    deterministic, random_crops = segmentation_transforms(config, samples_per_volume=settings.batch_size)
    transform = Compose([*deterministic.transforms, *random_crops.transforms]).set_random_state(seed)
    dataset = CacheDataset(cases, transform, progress=False)
    _check_label_values(dataset, num_classes)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, generator=torch.Generator().manual_seed(seed))
    if context.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config)

    # Model: encoder and SA block from pretraining, decoder from scratch.
    model = build_segmenter(config, num_classes=num_classes, drop_path=0.1)
    model.load_pretrained_encoder(load_file(str(encoder_path)))
    # Channels-last 3D convolutions run about a third faster on CPU (oneDNN) and on recent GPUs.
    model.to(torch_device, memory_format=torch.channels_last_3d).train()
    # The SA block only maps attention at inference; it keeps its pretrained weights.
    if getattr(model, "sa", None) is not None:
        model.sa.requires_grad_(False)
    forward = model
    if context.is_distributed:
        forward = DistributedDataParallel(model)

    total_steps = settings.steps if max_steps is None else max_steps
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=settings.lr, weight_decay=settings.weight_decay)
    lr_schedule = cosine_schedule(settings.lr, settings.lr * 0.01, total_steps, warmup_steps=min(20, total_steps // 10))
    # Dice over the whole batch, so that crops without any label voxel still give a stable gradient.
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    metrics = MetricsLog(run_dir / "metrics.jsonl", append=False) if context.is_main else None
    bar = progress_bar(total_steps, "fine-tune", show_progress and context.is_main)
    started, step, loss_value = time.perf_counter(), 0, float("nan")
    try:
        while step < total_steps:
            for batch in loader:
                if step >= total_steps:
                    break
                for group in optimizer.param_groups:
                    group["lr"] = float(lr_schedule[step])
                images = batch["image"].as_tensor().to(torch_device, memory_format=torch.channels_last_3d)
                labels = batch["label"].as_tensor().to(torch_device).long()

                loss = loss_function(forward(images), labels)
                loss_value = float(context.sum(loss.detach()[None])[0]) / context.world_size
                if not math.isfinite(loss_value):
                    raise FloatingPointError(f"fine-tuning loss is {loss_value} at step {step}; lower finetune.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
                optimizer.step()

                if metrics is not None:
                    metrics.write({"step": step, "loss": round(loss_value, 6), "lr": float(lr_schedule[step])})
                bar.set_postfix(loss=f"{loss_value:.3f}")
                bar.update(1)
                step += 1
                if validate_every and validation_cases and step % validate_every == 0 and step < total_steps:
                    if context.is_main:
                        scores = _validate(model, config, validation_cases, names, torch_device)
                        metrics.write(_validation_record(step - 1, scores))
                        model.train()
                    context.barrier()
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    if not context.is_main:
        context.barrier()
        return {"steps": step}
    atomic_save_safetensors(model.state_dict(), run_dir / MODEL_FILE)
    validation = None
    if validation_cases:
        rows_summary = _validate(model, config, validation_cases, names, torch_device, run_dir)
        validation = {"cases": len(validation_cases), "summary": rows_summary}
        final = MetricsLog(run_dir / "metrics.jsonl", append=True)
        final.write(_validation_record(step - 1, rows_summary))
        final.close()
    summary = {
        "task": "segmentation",
        "num_classes": num_classes,
        "labels": {str(value): name for value, name in sorted(names.items())},
        "steps": step,
        "final_loss": loss_value,
        "seconds": round(time.perf_counter() - started, 2),
        "pretrained_run": str(pretrained_run.resolve()),
        "training_data": {"datalist": str(Path(datalist).resolve()), "cases": len(cases)},
    }
    if validation is not None:
        summary["validation"] = validation
    atomic_write_text(run_dir / RUN_INFO, json.dumps(summary, indent=2) + "\n")
    context.barrier()
    return summary


def _validation_cases(datalist: Path) -> list[dict]:
    """Return the datalist's ``validation`` entries (with labels), or an empty list when it has none."""
    content = json.loads(Path(datalist).read_text(encoding="utf-8"))
    if not content.get("validation"):
        return []
    return load_datalist(datalist, "validation", require_labels=True)


def _validation_record(step: int, scores: dict) -> dict:
    """Return the metrics.jsonl line of a validation check after step index ``step`` (0-based, as loss lines)."""
    return {"step": step, **{f"validation_dice_{name}": entry["dice_mean"] for name, entry in scores.items()}}


def _validate(model, config, cases: list[dict], names: dict[int, str], device, run_dir: Path | None = None) -> dict:
    """Score the validation cases with sliding-window inference; with ``run_dir``, write the files there."""
    from dagman_core.bundle import preprocessing_of

    from .evaluate import score_segmentation, summarize_segmentation

    model.eval()
    rows = score_segmentation(model, preprocessing_of(config), cases, names, device, show_progress=False)
    summary = summarize_segmentation(rows, names, run_dir, prefix="validation_dice")
    for name, entry in summary.items():
        logger.info("validation %s: Dice %.3f ± %.3f over %d cases", name, entry["dice_mean"], entry["dice_std"], len(rows))
    if run_dir is not None:
        atomic_write_text(run_dir / "validation.json", json.dumps(json_safe({"summary": summary, "cases": rows}), indent=2) + "\n")
    return summary


def _check_label_values(dataset: CacheDataset, num_classes: int) -> None:
    """Raise when a cached label map contains a value with no name, which the loss could not encode."""
    for index in range(len(dataset._cache)):
        item = dataset._cache[index]
        largest = int(item["label"].max())
        if largest >= num_classes:
            source = item["label"].meta.get("filename_or_obj", f"case {index}")
            raise ValueError(
                f"label map {source} contains value {largest}, but the datalist names labels up to {num_classes - 1}; "
                "add the missing values to the datalist's 'labels' mapping"
            )


def load_finetuned(run_dir: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load the segmenter of a fine-tuning run folder; return ``(model, finetune.json content)``."""
    run_dir = Path(run_dir)
    info_path = run_dir / RUN_INFO
    if not info_path.exists():
        raise FileNotFoundError(f"not a fine-tuning run folder: {info_path} is missing (run 'dagman finetune' first)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    model = build_segmenter(read_run_config(run_dir), num_classes=int(info["num_classes"]))
    model.load_state_dict(load_file(str(run_dir / MODEL_FILE)))
    return model.to(device).eval(), info
