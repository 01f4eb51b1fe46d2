"""DAGMaN pretraining on unlabeled CT: data, student and teacher, schedules, then the step loop."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.transforms import Compose
from tqdm.contrib.logging import logging_redirect_tqdm

from dagman_core.codistillation import CoDistillation
from dagman_core.config import DAGMaNConfig
from dagman_core.data.datalist import load_datalist
from dagman_core.data.transforms import pretraining_transforms
from dagman_core.inference.pipeline import resolve_device
from dagman_core.schedules import cosine_schedule, ema_momentum_schedule, teacher_temperature_schedule

from .runs import (
    MetricsLog,
    atomic_save_safetensors,
    atomic_torch_save,
    atomic_write_text,
    finite_record,
    progress_bar,
    seed_everything,
    write_config,
)

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"


def parameter_groups(model: torch.nn.Module) -> list[dict]:
    """Split parameters into those with weight decay and biases and norms, which get none."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(".bias"):
            not_decayed.append(parameter)
        else:
            decayed.append(parameter)
    return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0, "no_decay": True}]


def build_loader(config: DAGMaNConfig, datalist: Path, seed: int) -> DataLoader:
    """Cache the deterministic preprocessing of every volume and return a shuffling loader of view pairs."""
    cases = load_datalist(datalist, "training")
    deterministic, random_views = pretraining_transforms(config)
    transform = Compose([*deterministic.transforms, *random_views.transforms]).set_random_state(seed)
    dataset = CacheDataset(cases, transform, progress=False)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=config.train.batch_size, shuffle=True, drop_last=False, generator=generator, num_workers=0)


def pretrain(
    config: DAGMaNConfig,
    datalist: str | Path,
    output_dir: str | Path,
    max_steps: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict:
    """Pretrain a DAGMaN encoder and write the run folder.

    The folder receives ``config.yaml``, ``metrics.jsonl`` (one line per step), ``checkpoint.pt``
    (student, teacher, centers, optimiser and step), ``encoder.safetensors`` (the teacher's encoder,
    which fine-tuning starts from) and ``summary.json``.

    Args:
        config: the resolved configuration.
        datalist: MONAI-style datalist JSON whose ``training`` list names the CT volumes.
        output_dir: the run folder (created when missing).
        max_steps: stop after this many steps; the schedules then span ``max_steps``.
        device: ``cpu`` or ``cuda``.
        show_progress: show a progress bar on stderr.

    Returns:
        The run summary (steps, final loss terms, seconds).
    """
    run_dir = Path(output_dir)
    torch_device = resolve_device(device)
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps {max_steps} must be at least 1")
    generator = seed_everything(config.train.seed)

    # Data: every epoch visits each volume once. The datalist is read before the run folder is made.
    loader = build_loader(config, Path(datalist), config.train.seed)
    steps_per_epoch = len(loader)
    total_steps = config.train.epochs * steps_per_epoch if max_steps is None else max_steps
    logger.info(
        "pretraining %s: %d volumes, steps per epoch: %d, steps: %d", config.name, len(loader.dataset), steps_per_epoch, total_steps
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)

    # Student and teacher: the teacher starts with the student's weights.
    model = CoDistillation(config).to(torch_device)
    model.train()

    # Optimiser and schedules, indexed by the global step.
    train = config.train
    lr = train.lr * train.batch_size / train.lr_reference_batch
    optimizer = torch.optim.AdamW(parameter_groups(model.student), lr=lr)
    lr_schedule = cosine_schedule(lr, train.min_lr, total_steps, warmup_steps=train.warmup_epochs * steps_per_epoch)
    wd_schedule = cosine_schedule(train.weight_decay, train.weight_decay_final, total_steps)
    momentum_schedule = ema_momentum_schedule(train.ema_momentum, total_steps)
    # A cold teacher (low temperature) at first keeps its targets sharp while they are nearly uniform.
    temperature_schedule = teacher_temperature_schedule(
        config.loss.teacher_temperature,
        config.loss.teacher_temperature_final,
        config.loss.teacher_temperature_warmup_epochs * steps_per_epoch,
        total_steps,
    )
    frozen_last_layer_steps = train.freeze_last_layer_epochs * steps_per_epoch

    # A fresh run replaces the metrics of an earlier run in the same folder.
    metrics = MetricsLog(run_dir / "metrics.jsonl", append=False)
    watch = CollapseWatch(config)
    bar = progress_bar(total_steps, "pretrain", show_progress)
    started = time.perf_counter()
    step, last = 0, {}
    try:
        with logging_redirect_tqdm():
            while step < total_steps:
                for batch in loader:
                    if step >= total_steps:
                        break
                    last = _train_step(
                        model, optimizer, batch, step, generator, torch_device,
                        lr_schedule, wd_schedule, momentum_schedule, temperature_schedule, frozen_last_layer_steps, train.clip_grad,
                    )
                    last["epoch"] = step // steps_per_epoch
                    metrics.write(last)
                    step += 1
                    watch.observe(last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                    bar.update(1)
    except NonFiniteLossError as error:
        _write_summary(run_dir, step, started, len(loader.dataset), watch, last, stopped=str(error))
        raise
    finally:
        bar.close()
        metrics.close()

    # The teacher's encoder is the pretrained model, as in DINO and iBOT.
    atomic_torch_save(
        {
            "student": model.student.state_dict(),
            "teacher": model.teacher.state_dict(),
            "centers": model.centers.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
        },
        run_dir / "checkpoint.pt",
    )
    atomic_save_safetensors(model.teacher.encoder.state_dict(), run_dir / ENCODER_FILE)

    return _write_summary(run_dir, step, started, len(loader.dataset), watch, last)


def _write_summary(run_dir: Path, steps: int, started: float, volumes: int, watch: "CollapseWatch", last: dict,
                   stopped: str | None = None) -> dict:
    """Write ``summary.json``; ``stopped`` is the error message of a run that ended early."""
    summary = {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 2),
        "volumes": volumes,
        "skipped_nonfinite_steps": watch.skipped,
        "final": finite_record(last),
    }
    if stopped is not None:
        summary["stopped"] = stopped
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


class NonFiniteLossError(FloatingPointError):
    """Too many steps in a row had a NaN or infinite loss."""


class CollapseWatch:
    """Count skipped non-finite steps and warn when the teacher's output looks collapsed.

    A run stops with ``NonFiniteLossError`` after ``train.max_nonfinite_steps`` skipped steps in a row.
    A teacher whose entropy stays within 1 % of ln K (uniform) or below 1 % of ln K (one-hot) for
    ``patience`` steps is reported once as a warning: both are the known collapse modes of DINO-style
    self-distillation.
    """

    def __init__(self, config: DAGMaNConfig, patience: int = 50):
        self.limit = config.train.max_nonfinite_steps
        self.log_k = math.log(config.loss.out_dim)
        self.patience = patience
        self.in_a_row = 0
        self.skipped = 0
        self.flat_steps = 0
        self.warned = False

    def observe(self, record: dict) -> None:
        """Account for one step's metrics record (as written to ``metrics.jsonl``)."""
        if record.get("skipped"):
            self.in_a_row += 1
            self.skipped += 1
            logger.warning("step %d: loss is %s; step skipped (%d in a row)", record["step"], record["loss"], self.in_a_row)
            if self.in_a_row >= self.limit:
                raise NonFiniteLossError(
                    f"{self.in_a_row} steps in a row had a non-finite loss (last at step {record['step']}); "
                    "lower train.lr, raise train.clip_grad or check the input volumes for NaN values "
                    "(train.max_nonfinite_steps sets how many are tolerated)"
                )
            return
        self.in_a_row = 0

        entropy = record.get("teacher_entropy")
        if entropy is None or not math.isfinite(entropy):
            return
        flat = entropy > 0.99 * self.log_k or entropy < 0.01 * self.log_k
        self.flat_steps = self.flat_steps + 1 if flat else 0
        if self.flat_steps >= self.patience and not self.warned:
            self.warned = True
            kind = "uniform" if entropy > 0.5 * self.log_k else "one-hot"
            logger.warning(
                "the teacher's output has been %s for %d steps (entropy %.4f, ln K %.4f): the run may have collapsed",
                kind, self.flat_steps, entropy, self.log_k,
            )


def _train_step(model, optimizer, batch, step, generator, device, lr_schedule, wd_schedule, momentum_schedule,
                temperature_schedule, frozen_last_layer_steps, clip_grad) -> dict:
    """Run one optimiser step and EMA update; a non-finite loss leaves every weight and center unchanged.

    Returns:
        The step's metrics record; ``skipped`` is true when the loss was NaN or infinite.
    """
    for group in optimizer.param_groups:
        group["lr"] = float(lr_schedule[step])
        if not group.get("no_decay"):
            group["weight_decay"] = float(wd_schedule[step])

    view_u = batch["view_u"].as_tensor().to(device)
    view_v = batch["view_v"].as_tensor().to(device)
    output = model(view_u, view_v, float(temperature_schedule[step]), generator)
    loss = output.total
    record = {
        "step": step,
        "loss": round(loss.item(), 6),
        **{name: round(value.item(), 6) for name, value in output.terms.items()},
        "lr": float(lr_schedule[step]),
        "weight_decay": float(wd_schedule[step]),
        "ema_momentum": float(momentum_schedule[step]),
        "teacher_temperature": float(temperature_schedule[step]),
        "teacher_entropy": round(output.teacher_entropy, 6),
        "teacher_kl_uniform": round(output.teacher_kl_uniform, 6),
        "masked_fraction": round(output.masked_fraction, 6),
        "log_k": float(np.log(model.config.loss.out_dim)),
        "skipped": not math.isfinite(loss.item()),
    }
    if record["skipped"]:
        optimizer.zero_grad(set_to_none=True)
        return record

    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.student.parameters(), clip_grad)
    if step < frozen_last_layer_steps:
        for parameter in model.student.last_layers():
            parameter.grad = None
    optimizer.step()
    model.update_teacher(float(momentum_schedule[step]))
    return record
