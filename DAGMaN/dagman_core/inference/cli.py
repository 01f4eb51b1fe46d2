"""Command line of inference, shared by ``dagman infer`` and ``python -m dagman_core.inference``.

Slicer runs the latter in a child process. With ``--progress json`` it prints one JSON object per line
(``stage``, ``fraction``, ``message``), and a failure ends with a line whose stage is ``error``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

logger = logging.getLogger("dagman_core.inference")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the inference options to ``parser``."""
    parser.add_argument("--model", required=True, help="model folder written by 'dagman export' (contains model.json)")
    parser.add_argument("--input", required=True, help="CT volume: NIfTI, NRRD or MHA file, or a DICOM series folder (HU)")
    parser.add_argument("--output", required=True, help="folder for result.json, attention.nrrd and, for segmentation, segmentation.nrrd")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--window-batch", type=int, default=1, help="sliding windows per forward pass (default: 1)")
    parser.add_argument("--mask", default=None, help="classification: centre the crop on this lesion mask (any grid covering the lesion)")
    parser.add_argument("--point", default=None, metavar="R,A,S", help="classification: centre the crop on this point, RAS mm as Slicer shows it")
    parser.add_argument(
        "--progress", choices=("bar", "json", "none"), default="bar", help="progress as a bar, JSON lines on stdout, or none"
    )
    return parser


class JsonProgress:
    """Print one JSON object per progress update on stdout, flushed at once for the reading process."""

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        print(json.dumps({"stage": stage, "fraction": round(float(fraction), 4), "message": message}), flush=True)


class BarProgress:
    """Show a tqdm bar on stderr for the sliding windows and log the other stages."""

    def __init__(self):
        self.bar = None

    def __call__(self, stage: str, fraction: float, message: str) -> None:
        from tqdm import tqdm

        from .pipeline import STAGE_SPANS

        if stage == "infer":
            if self.bar is None:
                # No rate in the bar: it jumps by whole windows, which makes a rate in %/s meaningless.
                description = "sliding windows" if message.startswith("window") else "classifying"
                self.bar = tqdm(total=100, desc=description, bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
            # The fraction is of the whole run; the bar shows the share of windows done.
            start, end = STAGE_SPANS["infer"]
            self.bar.n = round(100 * (fraction - start) / (end - start))
            self.bar.refresh()
            return
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        logger.info("%s: %s", stage, message)


def run(arguments: argparse.Namespace) -> int:
    """Run inference with parsed ``arguments``; return the process exit code."""
    from ..data.crops import parse_point
    from .pipeline import run_inference

    if arguments.progress == "json":
        progress = JsonProgress()
    elif arguments.progress == "bar":
        progress = BarProgress()
    else:
        progress = lambda stage, fraction, message: None  # noqa: E731

    try:
        point = parse_point(arguments.point) if arguments.point else None
        run_inference(
            arguments.model, arguments.input, arguments.output, arguments.device, arguments.window_batch, progress,
            mask_path=arguments.mask, point_ras=point,
        )
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(progress, BarProgress) and progress.bar is not None:
            progress.bar.close()
        message = f"inference failed: {error}"
        if arguments.progress == "json":
            print(json.dumps({"stage": "error", "fraction": 1.0, "message": message}), flush=True)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m dagman_core.inference``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    parser = add_arguments(argparse.ArgumentParser(prog="python -m dagman_core.inference", description="Run a DAGMaN model on a CT."))
    return run(parser.parse_args(argv))
