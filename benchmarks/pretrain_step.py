"""Measure the time and peak memory of one DAGMaN pretraining step against a student-only step.

A DAGMaN step is the trainer's step. It runs zero_grad, then ``CoDistillation.prepare``: two no-grad
teacher passes on patch-dropped views and the attention-guided masks. Then, one view at a time, the
student pass, that view's half of the four losses and its backward, so that one view's activations
are held at a time. Gradient clipping at 3.0, AdamW, the center update and the EMA teacher update end it.

A student-only step runs the same student passes, heads, losses and backward on masks built the same way, but
against fixed random targets drawn once with the shapes of the teacher's head outputs and against
fixed random attention scores. It has no teacher pass, no center update and no EMA update, so the
ratio of the two times is the cost of the teacher.

Each (mode, activation checkpointing) row runs in its own child process, so that the peak resident
set size of that process (``ru_maxrss``) belongs to that row alone. On CUDA the row reports
``torch.cuda.max_memory_allocated`` instead. The Markdown result is printed and appended to
``docs/benchmarks.md`` with the date, the command line and the machine.

Example::

    .venv/bin/python benchmarks/pretrain_step.py --config tiny_cpu --batch-size 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPOSITORY / "docs" / "benchmarks.md"
MODES = {"dagman": "DAGMaN step", "student": "student-only step"}
CLIP_GRAD = 3.0
EMA_MOMENTUM = 0.996
GIB = 1024**3
ENVIRONMENT_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "GOMP_", "KMP_", "PYTORCH_", "CUDA_VISIBLE_DEVICES", "LD_PRELOAD")

INTRO = """# Pretraining step benchmarks

Each section below was written by `benchmarks/pretrain_step.py`. It compares one DAGMaN pretraining
step with a student-only step. The DAGMaN step is the trainer's step: two no-grad teacher passes on
patch-dropped views, attention-guided masks, then per view the student pass, the four losses (AITD,
AMPD, GITD, AMIP) and backward, then gradient clipping, AdamW, the center update and the EMA teacher
update. The student-only step runs the same student passes, heads, losses and backward on masks of
the same kind. It scores them against fixed random targets, so it has no teacher pass, no center
update and no EMA update. The ratio of the two times is the cost of the teacher.

Every row runs in one or more processes of its own. Times are wall-clock seconds per optimiser step,
after warmup steps. On CPU the memory columns are the resident set size (RSS) of that process before
the first step, when the model, teacher, optimiser and inputs are built, and its peak (`ru_maxrss`)
over all steps. Their difference includes the AdamW state that the first step allocates. Other
processes may run on the machine at the same time. Each row therefore gives the 1-minute load
average before and after it and the CPU time that other processes used while it ran, in cores.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time one DAGMaN pretraining step against a student-only step and append the table to docs/benchmarks.md."
    )

    parser.add_argument("--config", default="tiny_cpu", help="preset name or YAML file (default: tiny_cpu)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="configuration override, e.g. data.crop_size=96 (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="crops per view (default: the preset's train.batch_size)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per row (default: 5)")
    parser.add_argument(
        "--warmup", type=int, default=5,
        help="untimed steps before the timed ones (default: 5). On CPU the first steps of a process are slower "
        "while glibc malloc raises its mmap threshold and the page faults per step fall",
    )
    parser.add_argument(
        "--checkpoint-activations", choices=("on", "off", "both"), default="off",
        help="recompute the student's backbone stages in backward: on, off or both rows (default: off)",
    )
    parser.add_argument(
        "--modes", choices=("both", "dagman", "student"), default="both",
        help="which steps to measure: the DAGMaN step, the student-only step or both (default: both)",
    )
    parser.add_argument(
        "--processes", type=int, default=1,
        help="child processes per row, run in turn with the other rows' (default: 1). Step times vary more between "
        "processes than within one, so several processes give a fairer ratio",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device to run on (default: cpu)")
    parser.add_argument(
        "--profile", action="store_true",
        help="also time the parts of each step (teacher passes, masks, student passes, losses, backward, "
        "optimiser, EMA) and add a table of them",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT,
        help="Markdown file to append the result to (default: docs/benchmarks.md); '-' prints only",
    )
    parser.add_argument("--child-spec", help=argparse.SUPPRESS)

    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is invalid; it must be at least 1")
    if args.processes < 1:
        parser.error(f"--processes {args.processes} is invalid; it must be at least 1")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup} is invalid; it must be 0 or more")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} is invalid; it must be at least 1")
    return args


# ---------------------------------------------------------------------------------------------------
# Child process: one row.


class PartTimer:
    """Wall-clock seconds per named part of the current step, collected by wrapping methods."""

    def __init__(self, synchronize):
        self.synchronize = synchronize
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner, attribute: str, name: str) -> None:
        """Replace ``owner.attribute`` (a bound method) by one that adds its run time to ``name``."""
        original = getattr(owner, attribute)

        def timed(*args, **kwargs):
            self.synchronize()
            started = time.perf_counter()
            result = original(*args, **kwargs)
            self.synchronize()
            self.current[name] += time.perf_counter() - started
            return result

        setattr(owner, attribute, timed)

    def measure(self, name: str, function, *args, **kwargs):
        """Call ``function`` and add its run time to ``name``."""
        self.synchronize()
        started = time.perf_counter()
        result = function(*args, **kwargs)
        self.synchronize()
        self.current[name] += time.perf_counter() - started
        return result

    def end_step(self, keep: bool) -> None:
        if keep:
            self.steps.append(dict(self.current))
        self.current = defaultdict(float)


def instrument(model, timer: PartTimer) -> None:
    """Wrap the parts of ``CoDistillation.prepare`` and ``view_loss`` so that ``timer`` splits a step into them.

    The step times ``prepare`` and ``view_loss`` as wholes too, so the part of each that no wrapper
    covers is reported on its own line: bookkeeping in ``prepare``, the loss terms in ``view_loss``.
    """
    timer.wrap(model, "_teacher_dropout", "teacher patch dropout draw")
    timer.wrap(model.teacher.encoder, "forward", "teacher encoder (no grad)")
    for name, head in model.teacher.heads.items():
        timer.wrap(head, "forward", f"teacher head {name} (no grad)")
    timer.wrap(model, "_ranking_scores", "ranking scores")
    timer.wrap(model, "make_mask", "mask building")
    timer.wrap(model.student.encoder, "forward", "student encoder forward")
    for name, head in model.student.heads.items():
        timer.wrap(head, "forward", f"student head {name} forward")
    if model.student.reconstruction_head is not None:
        timer.wrap(model.student.reconstruction_head, "forward", "student reconstruction head forward")


PREPARE_PARTS = ("teacher patch dropout draw", "teacher encoder (no grad)", "ranking scores", "mask building")


def split_forward(parts: dict[str, float]) -> dict[str, float]:
    """Replace the ``prepare`` and ``view_loss`` totals by the time that no wrapped part inside them covers."""
    parts = dict(parts)
    prepare = parts.pop("prepare (total)", None)
    view_losses = parts.pop("view losses (total)", None)
    if prepare is not None:
        covered = sum(value for name, value in parts.items() if name in PREPARE_PARTS or name.startswith("teacher head"))
        parts["rest of prepare (bookkeeping)"] = prepare - covered
    if view_losses is not None:
        covered = sum(value for name, value in parts.items() if name.startswith("student "))
        parts["loss terms"] = view_losses - covered
    return parts


class StudentOnly:
    """Student passes and the four DAGMaN losses against fixed random targets in place of the teacher.

    The targets have the shapes of the teacher's head outputs: ``cls`` and ``global`` (B, K), ``patch``
    (B, N, K). The masks are rebuilt every step by ``model.make_mask`` from fixed random scores, so mask
    building costs the same as in the DAGMaN step. ``prepare`` returns them in the form of
    ``CoDistillation.prepare``, so the step runs the same ``view_loss`` on them.
    """

    def __init__(self, model, views, seed: int = 1):
        import torch

        config, loss = model.config, model.config.loss
        device = views[0].device
        batch = views[0].shape[0]
        cells = math.prod(size // model.cell_voxels for size in views[0].shape[2:])
        shapes = {"cls": (batch, loss.out_dim), "patch": (batch, cells, loss.out_dim), "global": (batch, loss.out_dim)}

        # A teacher logit is the dot product of two unit vectors (the L2-normalised bottleneck and a
        # last-layer row of norm 1), so random directions give logits of standard deviation 1/sqrt(bottleneck).
        scale = loss.head_bottleneck_dim**-0.5
        random = torch.Generator(device=device).manual_seed(seed)
        self.model = model
        self.views = views
        self.targets = [
            {role: scale * torch.randn(shapes[role], generator=random, device=device) for role in model.student.head_names}
            for _ in views
        ]
        ranked = config.masking.mode.startswith("attention")
        self.scores = [torch.rand(batch, cells, generator=random, device=device) if ranked else None for _ in views]
        self.temperature = loss.teacher_temperature

    def prepare(self, generator):
        """Return the step's views, the fixed targets and freshly built masks, as ``model.prepare`` would."""
        import torch

        from dagman_core.codistillation import PreparedViews

        model, views = self.model, self.views
        with torch.no_grad():
            masks = [model.make_mask(view, scores, generator) for view, scores in zip(views, self.scores)]
        return PreparedViews(views, self.targets, masks, self.temperature)


def run_row(spec: dict) -> dict:
    """Build the model for one row, run its warmup and timed steps and return the measurements."""
    import psutil
    import torch

    from dagman_core.codistillation import CoDistillation
    from dagman_core.config import load_config
    from dagman_train.pretrain import parameter_groups

    # NOTE: the CUDA path (synchronised timing, max_memory_allocated) has not yet been run on a GPU.
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu")
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)

    torch.manual_seed(0)
    config = load_config(spec["config"], overrides=spec["overrides"])
    model = CoDistillation(config).to(device)
    model.train()
    model.student.encoder.backbone.checkpoint_activations = spec["checkpoint"]
    optimizer = torch.optim.AdamW(parameter_groups(model.student), lr=1e-4)

    crop, batch = config.data.crop_size, config.train.batch_size
    views = (torch.rand(batch, 1, crop, crop, crop, device=device), torch.rand(batch, 1, crop, crop, crop, device=device))
    generator = torch.Generator().manual_seed(0)
    temperature = config.loss.teacher_temperature

    timer = PartTimer(synchronize) if spec["profile"] else None
    student_only = StudentOnly(model, views) if spec["mode"] == "student" else None
    if timer is not None:
        instrument(model, timer)

    def call(part: str, function, *args):
        if timer is None:
            return function(*args)
        return timer.measure(part, function, *args)

    def step() -> float:
        # The trainer's order: the no-grad half, then forward and backward of one student view at a time.
        optimizer.zero_grad(set_to_none=True)
        if student_only is None:
            prepared = call("prepare (total)", model.prepare, *views, temperature, generator)
        else:
            prepared = call("prepare (total)", student_only.prepare, generator)
        value = 0.0
        for index in (0, 1):
            half = call("view losses (total)", model.view_loss, prepared, index)
            total = model.weighted_total(half)
            value += total.item()
            call("backward", total.backward)
        if not math.isfinite(value):
            raise FloatingPointError(f"the {spec['mode']} step's loss is {value}, not finite; check the --set overrides")

        call("gradient clipping", torch.nn.utils.clip_grad_norm_, model.student.parameters(), CLIP_GRAD)
        call("AdamW step", optimizer.step)
        if student_only is None:
            center_logits = model.summarize(prepared, torch.tensor(value), half, update_centers=False).center_logits
            call("center update", model.update_centers, center_logits)
            call("EMA teacher update", model.update_teacher, EMA_MOMENTUM)
        return value

    process = psutil.Process()
    synchronize()
    rss_before = process.memory_info().rss
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)

    times, losses, user, system, faults = [], [], [], [], []
    for index in range(spec["warmup"] + spec["repeats"]):
        synchronize()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        losses.append(step())
        synchronize()
        elapsed = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        timed = index >= spec["warmup"]
        if timed:
            times.append(elapsed)
            user.append(after.ru_utime - usage.ru_utime)
            system.append(after.ru_stime - usage.ru_stime)
            faults.append(after.ru_minflt - usage.ru_minflt)
        if timer is not None:
            timer.end_step(keep=timed)
        print(f"  {spec['mode']} step {index + 1}: {elapsed:.3f} s{'' if timed else ' (warmup)'}", file=sys.stderr, flush=True)

    result = {
        "times": times,
        "losses": losses,
        "user_cpu": user,
        "system_cpu": system,
        "minor_faults": faults,
        "rss_before": rss_before,
        "maxrss_before": maxrss_before,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
        "student_parameters": sum(parameter.numel() for parameter in model.student.parameters()),
        "teacher_parameters": sum(parameter.numel() for parameter in model.teacher.parameters()),
    }
    if cuda:
        result["allocated_before"] = allocated_before
        result["peak_allocated"] = torch.cuda.max_memory_allocated(device)
    if timer is not None:
        result["parts"] = [split_forward(parts) for parts in timer.steps]
    return result


# ---------------------------------------------------------------------------------------------------
# Parent process: rows, machine description and the Markdown section.


def cpu_name() -> str:
    """Return the CPU model from /proc/cpuinfo, or the platform module's processor name elsewhere."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return cpu


def describe_machine(device: str) -> dict:
    import psutil
    import torch

    cpu = cpu_name()
    machine = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "physical_cores": psutil.cpu_count(logical=False),
        "memory_gib": psutil.virtual_memory().total / GIB,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }
    if device == "cuda" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name(0)
    return machine


def describe_config(config_name: str, overrides: list[str]) -> tuple[str, dict]:
    from dagman_core.codistillation import parameter_counts
    from dagman_core.config import load_config

    config = load_config(config_name, overrides=overrides)
    model, loss, masking = config.model, config.loss, config.masking
    if model.backbone == "vit":
        backbone = f"ViT width {model.vit_width}, depth {model.vit_depth}, patch {model.vit_patch_size}"
    else:
        backbone = (
            f"Swin embed {model.embed_dim}, depths {list(model.depths)}, heads {list(model.num_heads)}, "
            f"SA block at stage {model.sa_stage} with {model.sa_heads} heads"
        )
    counts = parameter_counts(config)
    text = (
        f"{backbone}; crops {config.data.crop_size}^3, batch {config.train.batch_size}; DINO heads K {loss.out_dim}, "
        f"hidden {loss.head_hidden_dim}, bottleneck {loss.head_bottleneck_dim} ({loss.heads}); masking {masking.mode}, "
        f"ratio {masking.ratio}, noisy teacher {'on' if masking.noisy_teacher else 'off'}; "
        f"student {counts['total'] / 1e6:.2f} M parameters ({counts['heads'] / 1e6:.2f} M in the DINO heads)"
    )
    return text, {"crop": config.data.crop_size, "batch": config.train.batch_size}


def busy_cpu_seconds() -> float:
    """Return the CPU seconds that all processes of the machine have used since boot."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, field, 0.0) for field in ("user", "nice", "system", "irq", "softirq"))


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_child(spec: dict) -> dict:
    """Run one row in a fresh interpreter and return its row record.

    Besides the child's JSON result, the record contains the 1-minute load average before and after the
    row. ``other_cores`` is the CPU time that other processes used while the row ran, divided by its
    wall-clock time, so 1.0 means that others kept one core busy for the whole row.
    """
    command = [sys.executable, str(Path(__file__).resolve()), "--child-spec", json.dumps(spec)]
    load_before = os.getloadavg()[0]
    busy_before, child_before, started = busy_cpu_seconds(), child_cpu_seconds(), time.perf_counter()
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPOSITORY)
    wall = time.perf_counter() - started
    other = (busy_cpu_seconds() - busy_before) - (child_cpu_seconds() - child_before)
    if completed.returncode != 0:
        raise SystemExit(f"the {spec['mode']} row (checkpointing {spec['checkpoint']}) failed with exit status {completed.returncode}; its error output is above")
    return {
        "mode": spec["mode"],
        "checkpoint": spec["checkpoint"],
        "result": json.loads(completed.stdout.strip().splitlines()[-1]),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "other_cores": max(other, 0.0) / wall,
    }


def merge_runs(runs: list[dict], cuda: bool) -> dict:
    """Merge the records of one row's processes into one row record.

    Times, losses and part timings are pooled over the processes. The memory figures are those of the
    process with the highest peak, so that its "before" and "peak" come from the same process.
    """
    peak_key = "peak_allocated" if cuda else "peak_rss"
    highest = max(runs, key=lambda run: run["result"][peak_key])
    pooled = ("times", "losses", "user_cpu", "system_cpu", "minor_faults")
    result = {key: value for key, value in highest["result"].items() if key not in (*pooled, "parts")}
    for key in pooled:
        result[key] = [value for run in runs for value in run["result"][key]]
    result["process_medians"] = [statistics.median(run["result"]["times"]) for run in runs]
    if "parts" in highest["result"]:
        result["parts"] = [parts for run in runs for parts in run["result"]["parts"]]
    return {
        "mode": runs[0]["mode"],
        "checkpoint": runs[0]["checkpoint"],
        "result": result,
        "load_before": runs[0]["load_before"],
        "load_after": runs[-1]["load_after"],
        "other_cores": statistics.fmean(run["other_cores"] for run in runs),
    }


def gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def format_rows(rows: list[dict], cuda: bool) -> list[str]:
    memory = ("allocated before first step", "peak allocated") if cuda else ("RSS before first step", "peak RSS")
    several = len(rows[0]["result"]["process_medians"]) > 1
    columns = [("step", "---"), ("activation checkpointing", "---"), ("median (s)", "---:"), ("min (s)", "---:")]
    if several:
        columns.append(("median of each process (s)", "---"))
    columns += [
        ("user / system CPU (s)", "---"),
        ("minor page faults", "---:"),
        (f"{memory[0]} (GiB)", "---:"),
        (f"{memory[1]} (GiB)", "---:"),
        ("increase (GiB)", "---:"),
        ("load avg 1 min (before / after)", "---"),
        ("other processes' CPU (cores)", "---:"),
    ]
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "|".join(align for _, align in columns) + "|"]

    for row in rows:
        result = row["result"]
        before = result["allocated_before"] if cuda else result["rss_before"]
        peak = result["peak_allocated"] if cuda else result["peak_rss"]
        cells = [
            MODES[row["mode"]],
            "on" if row["checkpoint"] else "off",
            f"{statistics.median(result['times']):.3f}",
            f"{min(result['times']):.3f}",
        ]
        if several:
            cells.append(", ".join(f"{value:.3f}" for value in result["process_medians"]))
        cells += [
            f"{statistics.median(result['user_cpu']):.2f} / {statistics.median(result['system_cpu']):.2f}",
            f"{statistics.median(result['minor_faults']):,.0f}",
            gib(before),
            gib(peak),
            gib(peak - before),
            f"{row['load_before']:.2f} / {row['load_after']:.2f}",
            f"{row['other_cores']:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def format_parts(rows: list[dict]) -> list[str]:
    """Return a table of the median seconds of each part, one column per row that was profiled."""
    profiled = [row for row in rows if "parts" in row["result"]]
    if not profiled:
        return []
    names: list[str] = []
    for row in profiled:
        for parts in row["result"]["parts"]:
            names.extend(name for name in parts if name not in names)
    columns = [f"{MODES[row['mode']]}, checkpointing {'on' if row['checkpoint'] else 'off'} (s)" for row in profiled]
    lines = ["| part | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    medians = {}
    for name in names:
        cells = []
        for index, row in enumerate(profiled):
            steps = row["result"]["parts"]
            if not any(name in parts for parts in steps):
                medians[index, name] = 0.0
                cells.append("-")
                continue
            medians[index, name] = statistics.median(parts.get(name, 0.0) for parts in steps)
            cells.append(f"{medians[index, name]:.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    sums = [sum(medians[index, name] for name in names) for index in range(len(profiled))]
    lines.append("| sum of the part medians | " + " | ".join(f"{value:.3f}" for value in sums) + " |")
    return lines


def check_rows(rows: list[dict], cuda: bool) -> tuple[list[str], list[str]]:
    """Return the ratio lines and the sanity checks of the measured rows."""
    def find(mode, checkpoint):
        return next((row for row in rows if row["mode"] == mode and row["checkpoint"] == checkpoint), None)

    def median(row):
        return statistics.median(row["result"]["times"])

    def cpu_seconds(row):
        result = row["result"]
        return statistics.median(u + s for u, s in zip(result["user_cpu"], result["system_cpu"]))

    def peak(row):
        result = row["result"]
        return result["peak_allocated"] if cuda else result["peak_rss"]

    ratios, checks = [], []
    for checkpoint in (False, True):
        dagman, student = find("dagman", checkpoint), find("student", checkpoint)
        if dagman and student:
            ratio = median(dagman) / median(student)
            fastest = min(dagman["result"]["times"]) / min(student["result"]["times"])
            cpu = cpu_seconds(dagman) / cpu_seconds(student)
            setting = "on" if checkpoint else "off"
            ratios.append(
                f"DAGMaN / student-only time, checkpointing {setting}: **{ratio:.2f}** from the medians, "
                f"{fastest:.2f} from the minimums, {cpu:.2f} from the median user + system CPU time"
            )
            verdict = "passed" if median(student) < median(dagman) else "FAILED"
            checks.append(f"student-only step faster than the DAGMaN step (checkpointing {setting}): {verdict}")
    for mode in MODES:
        off, on = find(mode, False), find(mode, True)
        if off and on:
            lower = "passed" if peak(on) < peak(off) else "FAILED"
            slower = "passed" if median(on) > median(off) else "FAILED"
            saved = (peak(off) - peak(on)) / GIB
            extra = median(on) / median(off) - 1.0
            checks.append(f"checkpointing lowers the peak of the {MODES[mode]} ({saved:.2f} GiB less): {lower}")
            checks.append(f"checkpointing costs time in the {MODES[mode]} ({extra:+.0%}): {slower}")
    for row in rows:
        result = row["result"]
        if not cuda and result["maxrss_before"] >= result["peak_rss"]:
            checks.append(
                f"the {MODES[row['mode']]} process reached its peak RSS before the first step, "
                "so the peak column is not the step's: FAILED"
            )
        losses = result["losses"]
        if not all(math.isfinite(value) for value in losses):
            checks.append(f"finite losses in the {MODES[row['mode']]}: FAILED")
    return ratios, checks


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_spec:
        print(json.dumps(run_row(json.loads(args.child_spec))), flush=True)
        return

    started = time.perf_counter()
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    config_text, sizes = describe_config(args.config, overrides)
    machine = describe_machine(args.device)
    cuda = args.device == "cuda"
    if cuda and "gpu" not in machine:
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu")

    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpoint_activations]
    modes = ["dagman", "student"] if args.modes == "both" else [args.modes]
    runs: dict[tuple[bool, str], list[dict]] = defaultdict(list)
    for process in range(args.processes):
        for checkpoint in settings:
            for mode in modes:
                spec = {
                    "config": args.config, "overrides": overrides, "mode": mode, "checkpoint": checkpoint,
                    "warmup": args.warmup, "repeats": args.repeats, "device": args.device, "profile": args.profile,
                }
                label = f"{MODES[mode]}, checkpointing {'on' if checkpoint else 'off'}, process {process + 1}/{args.processes}"
                print(f"{label}:", file=sys.stderr, flush=True)
                runs[checkpoint, mode].append(run_child(spec))
    rows = [merge_runs(runs[checkpoint, mode], cuda) for checkpoint in settings for mode in modes]
    elapsed = time.perf_counter() - started

    # Allocator and threading variables change the time and memory columns, so the recorded command includes them.
    environment = [f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith(ENVIRONMENT_PREFIXES)]
    command = shlex.join([*environment, ".venv/bin/python", "benchmarks/pretrain_step.py", *(argv if argv is not None else sys.argv[1:])])
    threads = rows[0]["result"]["threads"]
    hardware = (
        f"{machine['cpu']}, {machine['physical_cores']} physical / {machine['logical_cores']} logical cores "
        f"(torch uses {threads} threads), {machine['memory_gib']:.1f} GiB RAM"
    )
    if cuda:
        hardware += f", GPU {machine['gpu']}"
    memory = (
        "the peak is `torch.cuda.max_memory_allocated` over all steps of the row. \"Before\" is the memory "
        "allocated before the first step"
        if cuda else
        "the peak is the resident set size (RSS) of the row's process over all steps (`ru_maxrss`). \"Before\" is "
        "its RSS before the first step, with the model, EMA teacher, optimiser and inputs built but no AdamW state"
    )
    title = args.config if not args.overrides else f"{args.config} with {len(args.overrides)} overrides"
    section = [
        "",
        f"## {title}, batch {sizes['batch']}, {sizes['crop']}^3 crops, {args.device} ({datetime.now().astimezone():%Y-%m-%d %H:%M %Z})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {hardware}; {machine['system']}, Python {machine['python']}, torch {machine['torch']}.",
        "",
        f"Configuration: {config_text}.",
        "",
        f"Each row runs in {args.processes} process(es) of its own, taken in turn with the other rows: "
        f"{args.warmup} warmup step(s), then {args.repeats} timed step(s) per process. Times are wall-clock "
        f"seconds per optimiser step, pooled over the processes. The CPU and page fault columns are medians per "
        f"step of the process's `getrusage` counters (all threads). Memory: {memory}"
        f"{'. With several processes, both come from the process with the highest peak' if args.processes > 1 else ''}.",
        "",
        *format_rows(rows, cuda),
        "",
    ]
    ratios, checks = check_rows(rows, cuda)
    section += [f"{line}." for line in ratios] + ([""] if ratios else [])
    parts = format_parts(rows)
    if parts:
        section += [
            "Median seconds per step of each part (wrapped with `time.perf_counter`; the teacher's head rows are "
            "inside its no-grad pass, the student's rows are forward only, their backward is in `backward`):",
            "",
            *parts,
            "",
        ]
    if checks:
        section += ["Checks:", "", *[f"- {line}" for line in checks], ""]
    section.append(f"The script took {elapsed:.0f} s.")
    text = "\n".join(section) + "\n"
    print(text)

    if str(args.output) != "-":
        output = args.output if args.output.is_absolute() else Path.cwd() / args.output
        output.parent.mkdir(parents=True, exist_ok=True)
        existing = output.read_text() if output.exists() else ""
        output.write_text((existing or INTRO) + text)
        print(f"appended to {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
