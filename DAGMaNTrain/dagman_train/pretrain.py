"""DAGMaN pretraining on unlabeled CT: one process or many under torchrun, resumable at any checkpoint.

The loop runs the student in DistributedDataParallel when torchrun starts several processes (gloo on
CPU, NCCL on GPU). Rank 0 alone writes the run folder: ``config.yaml``, ``metrics.jsonl``, TensorBoard
events in ``tensorboard/``, ``checkpoints/``, ``encoder.safetensors`` and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm.contrib.logging import logging_redirect_tqdm

from dagman_core.codistillation import CoDistillation
from dagman_core.config import DAGMaNConfig
from dagman_core.data.datalist import load_datalist
from dagman_core.schedules import cosine_schedule, ema_momentum_schedule, teacher_temperature_schedule

from .checkpoints import load_latest_checkpoint, random_states, restore_random_states, save_checkpoint
from .distributed import DistributedContext, setup_distributed
from .pretrain_data import PretrainingViews, StepBatchSampler, cache_folder, prepare_cases
from .runs import (
    MetricsLog,
    atomic_save_safetensors,
    atomic_write_text,
    finite_record,
    progress_bar,
    read_run_config,
    seed_everything,
    write_config,
)

logger = logging.getLogger(__name__)

ENCODER_FILE = "encoder.safetensors"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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


class ViewLoss(torch.nn.Module):
    """``CoDistillation.view_loss`` as a module's forward, so that DistributedDataParallel can wrap it.

    DDP synchronises gradients in the backward of its own forward calls, and the trainer calls it once
    per student view.
    """

    def __init__(self, model: CoDistillation):
        super().__init__()
        self.model = model

    def forward(self, prepared, index: int) -> dict[str, torch.Tensor]:
        return self.model.view_loss(prepared, index)


def autocast_for(precision: str, device: torch.device):
    """Return the autocast context of ``train.precision`` on ``device``.

    ``auto`` is bf16 on a CUDA GPU that supports it and fp32 elsewhere; ``bf16`` also applies on CPU.
    """
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class StopRequest:
    """Note SIGTERM and SIGUSR1, which SLURM sends before it preempts a job, so that the loop can stop cleanly."""

    def __init__(self):
        self.signal_name: str | None = None
        self.previous = {}

    def __enter__(self):
        for number in STOP_SIGNALS:
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info):
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        self.signal_name = signal.Signals(number).name
        logger.warning("received %s: saving a checkpoint after this step, then exiting", self.signal_name)


def ignore_stop_signals(worker_id: int) -> None:
    """Make a loader worker ignore SIGTERM and SIGUSR1, so that the trainer can finish its step and save.

    torchrun and SLURM signal the whole process group, which contains the loader workers too. A worker
    that died of the signal would make the trainer's next batch fail before the checkpoint is written.
    """
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


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


class Schedules:
    """Per-step learning rate, weight decay, EMA momentum and teacher temperature of a run."""

    def __init__(self, config: DAGMaNConfig, steps_per_epoch: int, total_steps: int, world_size: int):
        train = config.train
        self.lr = train.lr * train.batch_size * world_size / train.lr_reference_batch
        self.learning_rate = cosine_schedule(self.lr, train.min_lr, total_steps, warmup_steps=train.warmup_epochs * steps_per_epoch)
        self.weight_decay = cosine_schedule(train.weight_decay, train.weight_decay_final, total_steps)
        self.momentum = ema_momentum_schedule(train.ema_momentum, total_steps)
        # A cold teacher (low temperature) at first keeps its targets sharp while they are nearly uniform.
        self.temperature = teacher_temperature_schedule(
            config.loss.teacher_temperature,
            config.loss.teacher_temperature_final,
            config.loss.teacher_temperature_warmup_epochs * steps_per_epoch,
            total_steps,
        )
        self.frozen_last_layer_steps = train.freeze_last_layer_epochs * steps_per_epoch


def pretrain(
    config: DAGMaNConfig | None,
    datalist: str | Path,
    output_dir: str | Path,
    max_steps: int | None = None,
    device: str = "cpu",
    show_progress: bool = True,
    resume: bool = False,
) -> dict:
    """Pretrain a DAGMaN encoder (or a baseline) and write the run folder.

    Args:
        config: the resolved configuration; None with ``resume`` reads the run folder's ``config.yaml``.
        datalist: MONAI-style datalist JSON whose ``training`` list names the CT volumes.
        output_dir: the run folder (created when missing).
        max_steps: stop after this many steps; the schedules then span ``max_steps``. A resumed run
            keeps the step count it started with unless this is given.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``; under torchrun each process takes its own GPU.
        show_progress: show a progress bar on stderr (rank 0 only).
        resume: continue from the newest complete checkpoint in ``output_dir``.

    Returns:
        The run summary (steps, seconds, skipped volumes and steps, final metrics). A run stopped by
        SIGTERM or SIGUSR1 returns after saving a checkpoint, with ``stopped`` naming the signal.
    """
    context = setup_distributed(device)
    try:
        return _pretrain(context, config, Path(datalist), Path(output_dir), max_steps, show_progress, resume)
    finally:
        context.close()


def _pretrain(context: DistributedContext, config, datalist: Path, run_dir: Path, max_steps, show_progress, resume) -> dict:
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps {max_steps} must be at least 1")
    checkpoint = None
    if resume:
        saved_config = read_run_config(run_dir)
        if config is not None and config.to_dict() != saved_config.to_dict():
            logger.warning("--resume uses the configuration stored in %s/config.yaml, not the one given", run_dir)
        config = saved_config
        found = load_latest_checkpoint(run_dir)
        if found is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {run_dir / 'checkpoints'}; start without --resume")
        checkpoint, checkpoint_file = found
        logger.info("resuming from %s (step %d)", checkpoint_file, checkpoint["step"])
    elif (run_dir / "metrics.jsonl").exists() or any((run_dir / "checkpoints").glob("checkpoint-*.pt")):
        raise ValueError(
            f"run folder {run_dir} already contains a pretraining run; continue it with --resume, "
            "or choose a new --output (or delete the folder) to start afresh"
        )
    seed_everything(config.train.seed)
    train = config.train

    # Data: rank 0 preprocesses every volume into the cache once; the others wait, then read the cache.
    cases = load_datalist(datalist, "training")
    cache_dir = cache_folder(config, run_dir)
    usable, skipped = None, None
    if context.is_main:
        cache_dir.mkdir(parents=True, exist_ok=True)
        usable, skipped = prepare_cases(cases, config, cache_dir, show_progress)
    usable, skipped = context.broadcast_object((usable, skipped))
    if not usable:
        raise ValueError(f"none of the {len(cases)} volumes in {datalist} could be loaded; see the warnings above")

    global_batch = train.batch_size * context.world_size
    steps_per_epoch = math.ceil(len(usable) / global_batch)
    total_steps = train.epochs * steps_per_epoch if max_steps is None else max_steps
    if checkpoint is not None and max_steps is None:
        total_steps = checkpoint["total_steps"]
    start_step = checkpoint["step"] if checkpoint is not None else 0
    if context.is_main:
        logger.info(
            "pretraining %s: %d volumes (%d skipped), %d processes, global batch %d, steps per epoch: %d, steps: %d",
            config.name, len(usable), len(skipped), context.world_size, global_batch, steps_per_epoch, total_steps,
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, config)

    dataset = PretrainingViews(usable, config, cache_dir)
    sampler = StepBatchSampler(len(usable), train.batch_size, context.world_size, context.rank, train.seed, start_step, total_steps)
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=config.data.num_workers, worker_init_fn=ignore_stop_signals,
        persistent_workers=config.data.num_workers > 0, pin_memory=context.device.type == "cuda",
    )

    # Student and teacher start alike on every process; stochastic depth then draws per process.
    model = CoDistillation(config).to(context.device)
    model.student.encoder.backbone.checkpoint_activations = train.checkpoint_activations
    if train.compile:
        model.student.encoder.compile()
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model.student), lr=train.lr)
    if checkpoint is not None:
        model.student.load_state_dict(checkpoint["student"])
        model.teacher.load_state_dict(checkpoint["teacher"])
        model.centers.load_state_dict(checkpoint["centers"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        states = checkpoint["random_states"]
        restore_random_states(states[context.rank] if len(states) == context.world_size else states[0])
    else:
        torch.manual_seed(train.seed + context.rank)
    forward = model
    if context.is_distributed:
        # Stage 4 feeds only AMIP and GITD; without both its parameters get no gradient.
        unused = not (config.loss.amip or config.loss.gitd) and config.model.backbone == "swin"
        forward = DistributedDataParallel(ViewLoss(model), broadcast_buffers=False, find_unused_parameters=unused)
    schedules = Schedules(config, steps_per_epoch, total_steps, context.world_size)

    metrics = writer = None
    if context.is_main:
        metrics = MetricsLog(run_dir / "metrics.jsonl", append=checkpoint is not None)
        if checkpoint is not None:
            metrics.truncate_from(start_step)
        writer = _tensorboard(run_dir)
    watch = CollapseWatch(config)
    if checkpoint is not None:
        watch.skipped = checkpoint.get("skipped_nonfinite_steps", 0)
    bar = progress_bar(total_steps, "pretrain", show_progress and context.is_main)
    bar.update(start_step)
    started = time.perf_counter()
    step, last, stopped = start_step, {}, None

    def save(done: int) -> None:
        states = context.gather_objects(random_states())
        if context.is_main:
            state = {
                "student": model.student.state_dict(),
                "teacher": model.teacher.state_dict(),
                "centers": model.centers.state_dict(),
                "optimizer": optimizer.state_dict(),
                "step": done,
                "epoch": done // steps_per_epoch,
                "total_steps": total_steps,
                "random_states": states,
                "skipped_nonfinite_steps": watch.skipped,
                "config": config.to_dict(),
            }
            save_checkpoint(run_dir, done, state, train.keep_last_checkpoints, train.keep_every_steps)

    try:
        with StopRequest() as stop_request, logging_redirect_tqdm():
            step_started = time.perf_counter()
            for batch in loader:
                last = _train_step(
                    forward, optimizer, batch, step, None, context.device,
                    schedules.learning_rate, schedules.weight_decay, schedules.momentum, schedules.temperature,
                    schedules.frozen_last_layer_steps, train.clip_grad,
                    context=context, precision=train.precision, stop_requested=stop_request.signal_name is not None,
                )
                stop_now = last.pop("stop_requested")
                now = time.perf_counter()
                last["epoch"] = step // steps_per_epoch
                last["volumes_per_second"] = round(global_batch / max(now - step_started, 1e-9), 4)
                step_started = now
                step += 1
                if context.is_main:
                    metrics.write(last)
                    _log_scalars(writer, last)
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                    bar.update(1)
                watch.observe(last)
                if stop_now:
                    stopped = stop_request.signal_name or "signal on another process"
                    save(step)
                    break
                if step % train.checkpoint_every_steps == 0 and step < total_steps:
                    save(step)
    except NonFiniteLossError as error:
        if context.is_main:
            _write_summary(run_dir, step, started, usable, skipped, watch, last, stopped=str(error))
        raise
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if writer is not None:
            writer.close()

    if stopped is not None:
        summary = {"steps": step, "stopped": stopped}
        if context.is_main:
            summary = _write_summary(run_dir, step, started, usable, skipped, watch, last, stopped=stopped)
            logger.info("stopped by %s after step %d; continue with --resume", stopped, step)
        return summary

    save(step)
    # Every process must end with the same weights and centers; a digest per rank shows that they do.
    digests = context.gather_objects(state_digest(model))
    if context.is_main:
        if len(set(digests)) > 1:
            logger.warning("the processes ended with different weights or centers: %s", digests)
        # The teacher's encoder is the pretrained model, as in DINO and iBOT.
        atomic_save_safetensors(model.teacher.encoder.state_dict(), run_dir / ENCODER_FILE)
        summary = _write_summary(run_dir, step, started, usable, skipped, watch, last)
        summary["rank_state_sha256"] = digests
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    else:
        summary = {"steps": step}
    context.barrier()
    return summary


def state_digest(model: CoDistillation) -> str:
    """Return the sha256 of the student's weights and the three centers, in state-dict order."""
    digest = hashlib.sha256()
    for module in (model.student, model.centers):
        for name, value in module.state_dict().items():
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _tensorboard(run_dir: Path):
    """Return a TensorBoard writer for ``run_dir/tensorboard``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.warning("tensorboard is not installed; scalars go to metrics.jsonl only (pip install tensorboard)")
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


TENSORBOARD_SCALARS = (
    "loss", "amip", "ampd", "aitd", "gitd", "lr", "weight_decay", "ema_momentum", "teacher_temperature",
    "teacher_entropy", "teacher_kl_uniform", "masked_fraction", "volumes_per_second",
)


def _log_scalars(writer, record: dict) -> None:
    if writer is None:
        return
    for key in TENSORBOARD_SCALARS:
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            writer.add_scalar(f"pretrain/{key}", value, record["step"])


def _write_summary(run_dir: Path, steps: int, started: float, usable: list, skipped: list, watch: "CollapseWatch",
                   last: dict, stopped: str | None = None) -> dict:
    """Write ``summary.json``; ``stopped`` is the reason a run ended early."""
    summary = {
        "steps": steps,
        "seconds": round(time.perf_counter() - started, 2),
        "volumes": len(usable),
        "skipped_volumes": skipped,
        "skipped_nonfinite_steps": watch.skipped,
        "final": finite_record(last),
    }
    if stopped is not None:
        summary["stopped"] = stopped
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _train_step(model, optimizer, batch, step, generator, device, lr_schedule, wd_schedule, momentum_schedule,
                temperature_schedule, frozen_last_layer_steps, clip_grad, context: DistributedContext | None = None,
                precision: str = "fp32", stop_requested: bool = False) -> dict:
    """Run one optimiser step and EMA update; a non-finite loss leaves every weight and center unchanged.

    Args:
        model: ``CoDistillation``, or the ``DistributedDataParallel`` wrapping its ``ViewLoss``.
        batch: ``view_u`` and ``view_v`` (B, 1, X, Y, Z) and, from ``PretrainingViews``, ``seed`` (B,).
        generator: the masking generator; None seeds one generator per image from ``batch["seed"]``.
        context: the process group; the skip decision, the logged losses and the stop request are
            agreed over all processes.
        stop_requested: this process received a stop signal; the record's ``stop_requested`` is true
            when any process did.

    Returns:
        The step's metrics record; ``skipped`` is true when the loss was NaN or infinite on any process.
    """
    distributed = isinstance(model, DistributedDataParallel)
    core = model.module.model if distributed else model
    view_loss = model if distributed else core.view_loss
    context = context or DistributedContext(0, 0, 1, torch.device(device))
    for group in optimizer.param_groups:
        group["lr"] = float(lr_schedule[step])
        if not group.get("no_decay"):
            group["weight_decay"] = float(wd_schedule[step])

    view_u, view_v = (_plain_tensor(batch[key]).to(device, non_blocking=True) for key in ("view_u", "view_v"))
    if generator is None:
        generator = [torch.Generator().manual_seed(int(seed)) for seed in batch["seed"]]
    temperature = float(temperature_schedule[step])
    with autocast_for(precision, device):
        prepared = core.prepare(view_u, view_v, temperature, generator)

    # Backward each student view before the next one runs, so that only one view's activations are
    # held. Gradients accumulate, and under DDP the first backward skips the gradient all-reduce.
    optimizer.zero_grad(set_to_none=True)
    halves = []
    for index in (0, 1):
        with model.no_sync() if distributed and index == 0 else contextlib.nullcontext():
            with autocast_for(precision, device):
                half = view_loss(prepared, index)
            core.weighted_total(half).float().backward()
        halves.append({name: value.detach().float() for name, value in half.items()})
    terms = {name: halves[0][name] + halves[1][name] for name in halves[0]}
    output = core.summarize(prepared, core.weighted_total(terms), terms, update_centers=False)
    loss = output.total.float()

    # One all-reduce agrees on the skip, averages the logged losses and spreads a stop request.
    names = sorted(output.terms)
    local = torch.stack([loss.detach(), *[output.terms[name].float() for name in names]])
    flags = torch.tensor([float(not torch.isfinite(local).all()), float(stop_requested)])
    reduced = context.sum(torch.cat([torch.nan_to_num(local, nan=0.0, posinf=0.0, neginf=0.0), flags.to(local.device)]))
    skipped = bool(reduced[-2] > 0)
    averages = (reduced[: len(names) + 1] / context.world_size).tolist()
    record = {
        "step": step,
        "loss": float("nan") if skipped else round(averages[0], 6),
        **{name: float("nan") if skipped else round(value, 6) for name, value in zip(names, averages[1:])},
        "lr": float(lr_schedule[step]),
        "weight_decay": float(wd_schedule[step]),
        "ema_momentum": float(momentum_schedule[step]),
        "teacher_temperature": float(temperature_schedule[step]),
        "teacher_entropy": round(output.teacher_entropy, 6),
        "teacher_kl_uniform": round(output.teacher_kl_uniform, 6),
        "masked_fraction": round(output.masked_fraction, 6),
        "log_k": float(np.log(core.config.loss.out_dim)),
        "skipped": skipped,
        "stop_requested": bool(reduced[-1] > 0),
    }
    if skipped:
        # The gradients of a non-finite loss are discarded, so weights, teacher and centers stay as they were.
        optimizer.zero_grad(set_to_none=True)
        return record

    core.update_centers(output.center_logits)
    torch.nn.utils.clip_grad_norm_(core.student.parameters(), clip_grad)
    if step < frozen_last_layer_steps:
        for parameter in core.student.last_layers():
            parameter.grad = None
    optimizer.step()
    core.update_teacher(float(momentum_schedule[step]))
    return record


def _plain_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return a MONAI ``MetaTensor`` as a plain tensor, so that no metadata follows it through the model."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor
