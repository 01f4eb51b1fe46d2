"""Compare the estimated peak memory of inference with the peak that the real inference child reaches.

Each case runs ``python -m dagman_core.inference --device cpu`` on a real CT with a bundle of random
(seeded) weights, in a process of its own. The parent reads that child's peak resident set size
(``ru_maxrss``) from ``os.wait4`` in a small wrapper interpreter, so the number belongs to that child alone. Next to it the table gives
the estimate of ``DAGMaNLib.memory.estimate_peak_memory`` and the ratio measured / estimate, which the
estimate's factors are tuned to keep within 0.67 to 1.5. The "import only" case measures the process
baseline: Python with the inference pipeline, torch, MONAI and SimpleITK imported.

The Markdown result is printed and appended to ``docs/benchmarks-inference-memory.md`` (or ``--output``)
with the date, the command line and the machine.

Example::

    .venv/bin/python benchmarks/inference_memory.py
    .venv/bin/python benchmarks/inference_memory.py --cases all
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
MODULE_DIR = REPOSITORY / "DAGMaN"
DEFAULT_OUTPUT = REPOSITORY / "docs" / "benchmarks-inference-memory.md"
DEFAULT_CT_DATA = Path(os.environ.get("DAGMAN_TEST_DATA", REPOSITORY.parent / "shared" / "data" / "ct"))
GIB = 1024**3
LOWEST_RATIO, HIGHEST_RATIO = 0.67, 1.5
CHILD_TIMEOUT_S = 1800

sys.path.insert(0, str(MODULE_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pretrain_step import cpu_name  # noqa: E402 (the benchmarks folder is put on sys.path above)

INTRO = """# Inference memory benchmarks

Each section below was written by `benchmarks/inference_memory.py`. It runs the inference child
(`python -m dagman_core.inference --device cpu`) on real CTs with bundles of random (seeded) weights,
one process per case, and reads the child's peak resident set size (`ru_maxrss`) from `os.wait4`.
The estimate is `DAGMaNLib.memory.estimate_peak_memory`, which the Slicer module shows before a run,
and the ratio is measured / estimate. The estimate's factors are tuned to keep that ratio within
0.67 to 1.5. Random weights make no difference to memory: the same layers run on the same shapes.
"""


@dataclass(frozen=True)
class Case:
    """One child run: a CT (a key of CTS), a bundle (a key of BUNDLES) and the windows per forward pass."""

    name: str
    ct: str
    bundle: str
    window_batch: int = 1


CTS = {
    "lung2": "pyradiomics_lung_tumor/lung2_image.nrrd",
    "abdomen_3mm": "totalsegmentator/abdomen_3mm/ct.nii.gz",
    "thorax": "itkelastix_thorax_ct/ct.nii.gz",
}

# Bundle name -> (preset, task).
BUNDLES = {
    "tiny_cpu segmentation": ("tiny_cpu", "segmentation"),
    "tiny_cpu classification": ("tiny_cpu", "classification"),
    "paper_swin segmentation": ("paper_swin", "segmentation"),
    "dagman_vit segmentation": ("dagman_vit", "segmentation"),
}

BASELINE_CASE = "import-only"
CASES = [
    Case(BASELINE_CASE, "", ""),
    Case("lung2-tiny-seg", "lung2", "tiny_cpu segmentation"),
    Case("lung2-tiny-seg-batch4", "lung2", "tiny_cpu segmentation", window_batch=4),
    Case("abdomen-tiny-seg", "abdomen_3mm", "tiny_cpu segmentation"),
    Case("thorax-tiny-seg", "thorax", "tiny_cpu segmentation"),
    Case("lung2-tiny-cls", "lung2", "tiny_cpu classification"),
    Case("thorax-tiny-cls", "thorax", "tiny_cpu classification"),
    # The paper-size networks take minutes on a CPU, so they run on the smallest scan only.
    Case("abdomen-paper_swin-seg", "abdomen_3mm", "paper_swin segmentation"),
    Case("abdomen-dagman_vit-seg", "abdomen_3mm", "dagman_vit segmentation"),
]
QUICK_CASES = [case.name for case in CASES if BUNDLES.get(case.bundle, ("tiny_cpu",))[0] == "tiny_cpu"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run the inference child on real CTs, compare its peak RSS with the memory estimate "
        "and append the table to docs/benchmarks-inference-memory.md."
    )
    parser.add_argument(
        "--cases", default="quick",
        help="'quick' (the tiny_cpu cases and the baseline, a few minutes on 2 cores), 'all' (adds paper_swin and "
        "dagman_vit segmentation, which take several more minutes) or a comma-separated list of case names",
    )
    parser.add_argument("--ct-data", type=Path, default=DEFAULT_CT_DATA, help=f"folder of the real CTs (default: {DEFAULT_CT_DATA})")
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT,
        help="Markdown file to append the result to (default: docs/benchmarks-inference-memory.md); '-' prints only",
    )
    args = parser.parse_args(argv)

    names = {case.name for case in CASES}
    if args.cases == "quick":
        args.selected = [case for case in CASES if case.name in QUICK_CASES]
    elif args.cases == "all":
        args.selected = list(CASES)
    else:
        requested = [name.strip() for name in args.cases.split(",") if name.strip()]
        unknown = [name for name in requested if name not in names]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; valid cases: {sorted(names)}")
        args.selected = [case for case in CASES if case.name in requested]
    for case in args.selected:
        if case.ct and not (args.ct_data / CTS[case.ct]).exists():
            parser.error(f"CT {args.ct_data / CTS[case.ct]} not found; pass --ct-data with the folder of the real CTs")
    return args


def write_bundle_for(name: str, folder: Path) -> Path:
    """Write a bundle of random (seeded) weights for ``BUNDLES[name]`` into ``folder`` and return its path."""
    from dagman_core.bundle import write_random_bundle

    preset, task = BUNDLES[name]
    return write_random_bundle(folder / name.replace(" ", "_"), preset=preset, seed=0, task=task)


# Runs the command given after the log path and the timeout, and prints its exit code and peak RSS
# as JSON. Linux carries a process's peak RSS across fork and exec, so a child started straight from
# this script, which has torch imported, would report at least this script's RSS. This small
# interpreter in between keeps that floor at a few MiB.
WRAPPER = """
import json, os, subprocess, sys, time
log_path, timeout_s, command = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
deadline = time.monotonic() + timeout_s
with open(log_path, "w", encoding="utf-8") as log:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            pid, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.2)
print(json.dumps({"returncode": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}))
"""


def measure_child(command: list[str], log_path: Path) -> tuple[int, int, float]:
    """Run ``command`` in the module folder and return (exit code, peak RSS in bytes, wall seconds).

    A small wrapper interpreter starts the command and reads its resource usage with ``os.wait4``,
    so ``ru_maxrss`` (KiB on Linux) is that command's own peak.
    """
    started = time.perf_counter()
    wrapper = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(log_path), str(CHILD_TIMEOUT_S), *command],
        cwd=MODULE_DIR, capture_output=True, text=True, check=True,
    )
    result = json.loads(wrapper.stdout.strip().splitlines()[-1])
    return result["returncode"], result["maxrss_kib"] * 1024, time.perf_counter() - started


def run_case(case: Case, ct_data: Path, bundles: dict[str, Path], work: Path) -> dict:
    """Run one case and return its row: the estimate, the measured peak and the time."""
    import SimpleITK as sitk

    from DAGMaNLib.memory import PROCESS_BASELINE_BYTES, estimate_peak_memory
    from dagman_core.bundle import read_model_json

    slug = case.name.replace(" ", "_").replace(",", "")
    log_path = work / f"{slug}.log"
    if case.name == BASELINE_CASE:
        code = "from dagman_core.inference import pipeline; from dagman_core.bundle import load_bundle"
        returncode, peak, seconds = measure_child([sys.executable, "-c", code], log_path)
        return {"case": case, "returncode": returncode, "peak": peak, "seconds": seconds,
                "estimate": PROCESS_BASELINE_BYTES, "stage": "baseline", "geometry": "", "log": log_path}

    ct_path = ct_data / CTS[case.ct]
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(ct_path))
    reader.ReadImageInformation()
    shape, spacing = reader.GetSize(), reader.GetSpacing()
    pixel_type = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bytes_per_voxel = sitk.Image(1, 1, 1, reader.GetPixelID()).GetSizeOfPixelComponent()

    bundle = bundles[case.bundle]
    description = read_model_json(bundle)
    estimate = estimate_peak_memory(
        description, shape, spacing, "cpu", window_batch=case.window_batch, input_bytes_per_voxel=bytes_per_voxel,
        weights_bytes=(bundle / "model.safetensors").stat().st_size,
    )
    output = work / f"output_{slug}"
    command = [
        sys.executable, "-m", "dagman_core.inference", "--model", str(bundle), "--input", str(ct_path),
        "--output", str(output), "--device", "cpu", "--progress", "none", "--window-batch", str(case.window_batch),
    ]
    returncode, peak, seconds = measure_child(command, log_path)
    geometry = f"{'x'.join(map(str, shape))}, {'x'.join(f'{value:.2f}' for value in spacing)} mm, {pixel_type}"
    return {"case": case, "returncode": returncode, "peak": peak, "seconds": seconds, "estimate": estimate.host_bytes,
            "stage": estimate.host_stage, "geometry": geometry, "log": log_path}


def describe_machine() -> str:
    import psutil
    import torch

    cpu = cpu_name()
    return (
        f"{cpu}, {psutil.cpu_count(logical=False)} physical / {os.cpu_count()} logical cores, "
        f"{psutil.virtual_memory().total / GIB:.1f} GiB RAM; {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} (threads {torch.get_num_threads()})"
    )


def format_rows(rows: list[dict]) -> list[str]:
    lines = [
        "| Case | CT | Bundle | CT voxels, spacing, type | Windows per pass | Estimate GiB (peak stage) | Measured peak RSS GiB | Measured / estimate | Wall s |",
        "|---|---|---|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        case = row["case"]
        ratio = row["peak"] / row["estimate"]
        flag = "" if LOWEST_RATIO <= ratio <= HIGHEST_RATIO else " (outside 0.67..1.5)"
        failed = "" if row["returncode"] == 0 else f" (exit code {row['returncode']})"
        batch = case.window_batch if case.ct else ""
        lines.append(
            f"| {case.name}{failed} | {case.ct} | {case.bundle} | {row['geometry']} | {batch} | {row['estimate'] / GIB:.2f} ({row['stage']}) | "
            f"{row['peak'] / GIB:.2f} | {ratio:.2f}{flag} | {row['seconds']:.0f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="dagman-memory-") as folder:
        work = Path(folder)
        bundles = {name: write_bundle_for(name, work) for name in sorted({case.bundle for case in args.selected if case.bundle})}
        for case in args.selected:
            print(f"{case.name}:", file=sys.stderr, flush=True)
            row = run_case(case, args.ct_data, bundles, work)
            if row["returncode"] != 0:
                print(row["log"].read_text(encoding="utf-8")[-4000:], file=sys.stderr)
            print(f"  estimate {row['estimate'] / GIB:.2f} GiB, measured {row['peak'] / GIB:.2f} GiB, {row['seconds']:.0f} s",
                  file=sys.stderr, flush=True)
            rows.append(row)
    elapsed = time.perf_counter() - started

    ratios = [row["peak"] / row["estimate"] for row in rows]
    inside = sum(LOWEST_RATIO <= ratio <= HIGHEST_RATIO for ratio in ratios)
    failed = [row["case"].name for row in rows if row["returncode"] != 0]
    environment = [f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith(("MALLOC_", "OMP_", "MKL_"))]
    command = shlex.join([*environment, ".venv/bin/python", "benchmarks/inference_memory.py", *(argv if argv is not None else sys.argv[1:])])
    section = [
        "",
        f"## {len(rows)} cases on cpu ({datetime.now().astimezone():%Y-%m-%d %H:%M %Z})",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {describe_machine()}.",
        "",
        "The estimate is the host peak of `estimate_peak_memory(model.json, CT size, CT spacing, \"cpu\", window_batch=..., "
        "input_bytes_per_voxel=..., weights_bytes=size of model.safetensors)`. The stage in brackets is where the "
        "estimate puts the peak. Other processes may run on the machine at the same time, but they do not change "
        "a child's own peak RSS.",
        "",
        *format_rows(rows),
        "",
        f"Ratio within {LOWEST_RATIO}..{HIGHEST_RATIO}: {inside} of {len(rows)} cases "
        f"(lowest {min(ratios):.2f}, highest {max(ratios):.2f}).",
    ]
    if failed:
        section.append(f"Failed runs (their peak is not a full run's): {', '.join(failed)}.")
    section += ["", f"The script took {elapsed:.0f} s."]
    text = "\n".join(section) + "\n"
    print(text)

    if str(args.output) != "-":
        output = args.output if args.output.is_absolute() else Path.cwd() / args.output
        output.parent.mkdir(parents=True, exist_ok=True)
        existing = output.read_text(encoding="utf-8") if output.exists() else ""
        output.write_text((existing or INTRO) + text, encoding="utf-8")
        print(f"appended to {output}", file=sys.stderr)
    return 0 if not failed and inside == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
