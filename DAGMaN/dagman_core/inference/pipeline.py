"""Whole-CT inference: segmentation and the S_ATT attention map, written on the input's exact geometry."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from .. import __version__
from ..bundle import load_bundle
from ..data.crops import Crop, classification_crop
from ..data.geometry import cell_grid_image, image_to_tensor_ijk, resample_to_ras, resample_to_reference, tensor_ijk_to_image
from ..data.io import read_image, write_image_atomic
from ..data.transforms import BODY_THRESHOLD, window_hu

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, float, str], None]


def _no_progress(stage: str, fraction: float, message: str) -> None:
    logger.info("%s (%.0f%%): %s", stage, 100 * fraction, message)


# Share of the whole run taken by each stage, so that reported fractions only ever grow.
STAGE_SPANS = {"load": (0.0, 0.05), "preprocess": (0.05, 0.1), "infer": (0.1, 0.9), "write": (0.9, 1.0), "done": (1.0, 1.0)}


def overall_progress(progress: ProgressCallback) -> ProgressCallback:
    """Wrap ``progress`` so that each stage's own fraction becomes a fraction of the whole run."""

    highest = [0.0]

    def report(stage: str, fraction: float, message: str) -> None:
        start, end = STAGE_SPANS.get(stage, (0.0, 1.0))
        # A retry after running out of memory starts its windows again; the reported share never falls.
        highest[0] = max(highest[0], start + (end - start) * min(max(fraction, 0.0), 1.0))
        progress(stage, highest[0], message)

    return report


def resolve_device(device: str) -> torch.device:
    """Turn ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` into a torch device; ``auto`` picks CUDA when present."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but this torch build ({torch.__version__}) sees no CUDA GPU; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"invalid device {device!r}; valid choices: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def check_window_stride(roi_size: tuple[int, int, int], overlap: float, cell_voxels: int) -> int:
    """Return the sliding-window stride in voxels, ``roi (1 - overlap)``; raise unless it is whole cells."""
    strides = {int(size * (1 - overlap)) for size in roi_size}
    if len(strides) != 1:
        raise ValueError(f"sliding windows must be cubes, got {roi_size}")
    stride = strides.pop()
    if stride < cell_voxels or stride % cell_voxels:
        raise ValueError(
            f"window stride {stride} voxels (window {roi_size[0]}, overlap {overlap}) must be a multiple of the "
            f"{cell_voxels}-voxel attention cell; choose an overlap such as 0.25 or 0.5"
        )
    return stride


def pad_for_windows(volume: torch.Tensor, roi_size: tuple[int, int, int], cell_voxels: int) -> torch.Tensor:
    """Pad a (B, C, X, Y, Z) volume at the high end to whole attention cells and at least one window.

    With the window stride also a whole number of cells, every window, the last one included (which
    MONAI places flush with the end), starts on a cell boundary, so its S_ATT lands on whole cells.
    """
    padding = []
    for size, roi in zip(reversed(volume.shape[2:]), reversed(roi_size)):
        target = max(roi, -(-size // cell_voxels) * cell_voxels)
        padding += [0, target - size]
    # Replicating the last slices keeps the anatomy continuous where a window reaches past the scan.
    return F.pad(volume, padding, mode="replicate")


def body_region(volume: torch.Tensor, cell_voxels: int, threshold: float, margin: int = 4) -> tuple[slice, slice, slice]:
    """Return the box (voxel slices) around the body of an (X, Y, Z) windowed CT.

    Training crops come from the same box (voxels above ``threshold`` plus ``margin``), so the
    network never has to judge the air around the patient. The box starts on a whole attention cell.
    """
    body = volume > threshold
    if not bool(body.any()):
        return tuple(slice(0, size) for size in volume.shape)

    region = []
    for axis, size in enumerate(volume.shape):
        other_axes = tuple(index for index in range(3) if index != axis)
        present = torch.nonzero(body.any(dim=other_axes)).flatten()
        start = max(int(present.min()) - margin, 0) // cell_voxels * cell_voxels
        stop = min(int(present.max()) + margin + 1, size)
        region.append(slice(start, stop))
    return tuple(region)


def place_region(
    probabilities: torch.Tensor,
    attention: torch.Tensor,
    region: tuple[slice, slice, slice],
    shape: tuple[int, int, int],
    cell_voxels: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Put the results of the body box back into the whole volume; outside it is background, attention 0.

    Args:
        probabilities: (1, C, x, y, z) class probabilities of the (padded) box.
        attention: (1, 1, x/c, y/c, z/c) attention cells of the (padded) box.
        region: the box's voxel slices in the whole volume, each starting on a whole cell.
        shape: (X, Y, Z) of the whole volume.
    """
    full_probabilities = torch.zeros(1, probabilities.shape[1], *shape)
    full_probabilities[:, 0] = 1.0
    sizes = [part.stop - part.start for part in region]
    full_probabilities[(slice(None), slice(None), *region)] = probabilities[:, :, : sizes[0], : sizes[1], : sizes[2]]

    cells = [-(-size // cell_voxels) for size in shape]
    full_attention = torch.zeros(1, 1, *cells)
    cell_region = []
    for part in region:
        start = part.start // cell_voxels
        cell_region.append(slice(start, start + -(-(part.stop - part.start) // cell_voxels)))
    box_cells = [part.stop - part.start for part in cell_region]
    full_attention[(slice(None), slice(None), *cell_region)] = attention[:, :, : box_cells[0], : box_cells[1], : box_cells[2]]
    return full_probabilities, full_attention


def predict_volume(
    model,
    volume: torch.Tensor,
    roi_size: tuple[int, int, int],
    overlap: float,
    window_batch: int,
    progress: ProgressCallback,
    blend: str = "gaussian",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run sliding-window inference over a whole volume.

    Args:
        model: a ``DAGMaNSegmenter`` in eval mode.
        volume: (1, 1, X, Y, Z) windowed CT on the network grid, each side a multiple of the cell size.
        roi_size: window size in voxels, a multiple of the cell size.
        overlap: fraction of overlap between neighbouring windows.
        window_batch: windows per forward pass.
        blend: how overlapping class probabilities are weighted (``gaussian`` or ``constant``).

    Returns:
        Class probabilities (1, C, X, Y, Z) and the attention (1, 1, X/c, Y/c, Z/c) on the cell grid.
        Each window's S_ATT is normalised to sum 1 and placed on its cells. Overlaps are averaged with
        equal weights, and the result is scaled so that its maximum is 1.
    """
    cell = model.cell_voxels
    cells = [size // cell for size in volume.shape[2:]]
    attention_sum = torch.zeros(cells, dtype=torch.float32, device=volume.device)
    attention_count = torch.zeros_like(attention_sum)
    windows_done = [0]

    def predictor(windows: torch.Tensor, locations) -> torch.Tensor:
        logits, s_att = model.forward_with_attention(windows)
        s_att = s_att.float() / s_att.float().sum(dim=(2, 3, 4), keepdim=True).clamp_min(1e-12)
        for index, location in enumerate(locations):
            cell_slices = tuple(slice(int(part.start) // cell, int(part.stop) // cell) for part in location[2:])
            attention_sum[cell_slices] += s_att[index, 0]
            attention_count[cell_slices] += 1.0

        windows_done[0] += windows.shape[0]
        progress("infer", min(windows_done[0] / max(total_windows, 1), 1.0), f"window {windows_done[0]} of {total_windows}")
        return torch.softmax(logits.float(), dim=1)

    steps = [max(int(size * (1 - overlap)), 1) for size in roi_size]
    total_windows = int(
        np.prod([max(int(np.ceil((full - roi) / step)), 0) + 1 for full, roi, step in zip(volume.shape[2:], roi_size, steps)])
    )
    with torch.inference_mode():
        probabilities = sliding_window_inference(
            volume, roi_size, window_batch, predictor, overlap=overlap, mode=blend, with_coord=True
        )
    attention = attention_sum / attention_count.clamp_min(1.0)
    attention = attention / attention.max().clamp_min(1e-12)
    return probabilities, attention[None, None]


def segmentation_images(
    reference: sitk.Image, ras_grid: sitk.Image, probabilities: torch.Tensor, attention: torch.Tensor, cell_voxels: int
) -> tuple[sitk.Image, sitk.Image]:
    """Resample the network outputs onto the input grid; return (uint8 labels, float32 attention in [0, 1])."""
    # Class probabilities, not labels, are resampled, so label borders follow the input grid smoothly.
    size = ras_grid.GetSize()
    resampled = []
    for channel in range(probabilities.shape[1]):
        on_ras = tensor_ijk_to_image(probabilities[0, channel, : size[0], : size[1], : size[2]], ras_grid)
        resampled.append(sitk.GetArrayFromImage(resample_to_reference(on_ras, reference, default_value=0.0)))
    labels = np.argmax(np.stack(resampled), axis=0).astype(np.uint8)
    segmentation = sitk.GetImageFromArray(labels)
    segmentation.CopyInformation(reference)

    cells = attention[0, 0].cpu().numpy().astype(np.float32)
    cell_image = tensor_ijk_to_image(cells, cell_grid_image(ras_grid, cell_voxels, cells.shape))
    on_input = sitk.Resample(cell_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    on_input = sitk.Clamp(on_input, sitk.sitkFloat32, 0.0, 1.0)
    on_input.CopyInformation(reference)
    return segmentation, on_input


def is_out_of_memory(error: BaseException) -> bool:
    """Return whether ``error`` is torch running out of GPU or CPU memory.

    On the CPU, torch's allocator raises a RuntimeError reading "DefaultCPUAllocator: can't allocate
    memory", and Python's own allocations raise MemoryError.
    """
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(error).lower()
    return "out of memory" in message or "can't allocate memory" in message


def predict_with_fallback(model, body, roi_size, overlap, window_batch, device, progress, blend):
    """Run ``predict_volume``; on running out of memory retry with one window per pass, then on the CPU.

    Each retry is logged and reported through ``progress``, so the user learns why the run slowed down.
    """
    attempts = [(window_batch, torch.device(device))]
    if window_batch > 1:
        attempts.append((1, torch.device(device)))
    if torch.device(device).type != "cpu":
        attempts.append((1, torch.device("cpu")))

    def attempt(batch: int, target: torch.device):
        model.to(target)
        return predict_volume(model, body.to(target), roi_size, overlap, batch, progress, blend=blend)

    for (batch, target), (next_batch, next_target) in zip(attempts, attempts[1:]):
        try:
            return attempt(batch, target)
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            if target.type == "cuda":
                torch.cuda.empty_cache()
            message = f"out of memory on {target} with {batch} window(s) per pass; retrying with {next_batch} on {next_target}"
            logger.warning(message)
            progress("infer", 0.0, message)
    return attempt(*attempts[-1])


def segment_image(
    model,
    preprocessing: dict,
    reference: sitk.Image,
    device: torch.device,
    window_batch: int = 1,
    progress: ProgressCallback | None = None,
    timings: dict | None = None,
) -> tuple[sitk.Image, sitk.Image]:
    """Segment one CT with a segmentation network; return (labels, attention) on the input's exact grid.

    Args:
        model: a segmenter in eval mode on ``device``.
        preprocessing: a bundle's ``preprocessing`` section (spacing, HU window, crop size, overlap).
        reference: the CT in HU.
        progress: called as ``progress(stage, fraction, message)`` in the stages preprocess and infer.
        timings: when given, receives the seconds of the preprocess and infer stages.
    """
    progress = progress or (lambda stage, fraction, message: None)
    timings = {} if timings is None else timings
    stage_started = time.perf_counter()
    progress("preprocess", 0.0, "resampling to the RAS grid")
    spacing_mm = float(preprocessing["spacing_mm"][0])
    roi_size = tuple(int(size) for size in preprocessing["crop_size"])
    overlap = float(preprocessing.get("sliding_window_overlap", 0.5))
    check_window_stride(roi_size, overlap, model.cell_voxels)
    ras_image = resample_to_ras(reference, spacing_mm)
    volume = window_hu(image_to_tensor_ijk(ras_image), tuple(preprocessing["hu_window"]))[None]
    region = body_region(volume[0, 0], model.cell_voxels, BODY_THRESHOLD)
    body = volume[(slice(None), slice(None), *region)]
    body = pad_for_windows(body, roi_size, model.cell_voxels)
    timings["preprocess"] = time.perf_counter() - stage_started

    stage_started = time.perf_counter()
    blend = preprocessing.get("sliding_window_blend", "gaussian")
    body_probabilities, body_attention = predict_with_fallback(model, body, roi_size, overlap, window_batch, device, progress, blend)
    probabilities, attention = place_region(
        body_probabilities.cpu(), body_attention.cpu(), region, tuple(volume.shape[2:]), model.cell_voxels
    )
    timings["infer"] = time.perf_counter() - stage_started
    return segmentation_images(reference, ras_image, probabilities, attention, model.cell_voxels)


def run_inference(
    model_dir: str | os.PathLike,
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    device: str = "auto",
    window_batch: int = 1,
    progress: ProgressCallback | None = None,
    mask_path: str | os.PathLike | None = None,
    point_ras: list[float] | None = None,
) -> dict:
    """Segment or classify a CT and map the model's attention; write the results into ``output_dir``.

    A segmentation model writes ``segmentation.nrrd``, ``attention.nrrd`` and ``result.json``; a
    classification model writes ``attention.nrrd`` and ``result.json`` with the class probabilities
    and the crop it used. The images share the input's size, spacing, origin and direction exactly.
    The files appear in ``output_dir`` only once all of them are complete.

    Args:
        model_dir: a bundle folder written by ``dagman export``.
        input_path: a NIfTI, NRRD or MHA file, or a DICOM series folder; intensities in HU.
        output_dir: the folder that receives the three files (created when missing).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        window_batch: sliding windows per forward pass.
        progress: called as ``progress(stage, fraction, message)``, with ``fraction`` the share of the
            whole run done (0..1, never decreasing).
        mask_path, point_ras: where a classification model centres its crop: the centre of mass of a
            lesion mask, or a point in RAS mm. Without either it follows the bundle's ``crop_mode``.

    Returns:
        The content of ``result.json``.
    """
    progress = overall_progress(progress or _no_progress)
    timings = {}
    started = time.perf_counter()
    torch_device = resolve_device(device)
    if mask_path is not None and point_ras is not None:
        raise ValueError("give a lesion mask or a point to centre the crop on, not both")

    progress("load", 0.0, f"loading model from {model_dir}")
    model, description = load_bundle(model_dir, torch_device)
    preprocessing = description["preprocessing"]
    progress("load", 0.5, f"reading {input_path}")
    reference = read_image(input_path)
    timings["load"] = time.perf_counter() - started
    if description["task"] != "classification" and (mask_path is not None or point_ras is not None):
        raise ValueError(
            f"a mask or point places a classification crop, but {description['name']!r} is a segmentation model, "
            "which reads the whole CT; leave out --mask and --point"
        )
    if description["task"] == "classification":
        return _classify(model, description, reference, Path(model_dir), input_path, Path(output_dir), torch_device,
                         mask_path, point_ras, progress, timings, started)

    segmentation, attention = segment_image(model, preprocessing, reference, torch_device, window_batch, progress, timings)

    stage_started = time.perf_counter()
    progress("write", 0.0, "writing the results")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dagman-infer-", dir=output_dir))
    try:
        write_image_atomic(segmentation, staging / "segmentation.nrrd")
        write_image_atomic(attention, staging / "attention.nrrd")
        timings["write"] = time.perf_counter() - stage_started
        timings["total"] = time.perf_counter() - started
        result = {
            "task": description["task"],
            "model": {"name": description["name"], "sha256": description["weights"]["sha256"], "folder": str(Path(model_dir).resolve())},
            "model_sha256": description["weights"]["sha256"],
            "input": str(input_path),
            "device": str(torch_device),
            "dagman_version": __version__,
            "labels": description["labels"],
            "outputs": {"segmentation": "segmentation.nrrd", "attention": "attention.nrrd"},
            "timings_s": {key: round(value, 3) for key, value in timings.items()},
        }
        (staging / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        for name in ("segmentation.nrrd", "attention.nrrd", "result.json"):
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    progress("done", 1.0, f"wrote results to {output_dir}")
    return result


def classify_image(model, description: dict, image: sitk.Image, mask=None, point_ras=None, device="cpu", mode: str | None = None):
    """Classify one CT with a classification bundle's model; return ``(probabilities (C,), S_ATT cells, crop)``.

    The crop follows the bundle's preprocessing: RAS grid, spacing, HU window, crop size, and
    ``crop_mode`` unless ``mode`` is given. ``mask`` (image or path) or ``point_ras`` (mm) place it.
    """
    preprocessing = description["preprocessing"]
    mode = mode or preprocessing.get("crop_mode", "auto")
    if mode in ("mask", "point") and mask is None and point_ras is None:
        mode = "auto"
    crop = classification_crop(
        image, float(preprocessing["spacing_mm"][0]), tuple(preprocessing["hu_window"]), int(preprocessing["crop_size"][0]),
        mode, mask=mask, point_ras=point_ras,
    )
    with torch.inference_mode():
        logits, s_att = model.forward_with_attention(crop.image[None].to(device))
    probabilities = torch.softmax(logits.float(), dim=1)[0].cpu().numpy()
    return probabilities, s_att[0, 0].float().cpu().numpy(), crop


def attention_on_input(cells: np.ndarray, crop: Crop, reference: sitk.Image, cell_voxels: int) -> sitk.Image:
    """Place a crop's S_ATT cells (n_x, n_y, n_z) on the input's grid, scaled to a maximum of 1, 0 outside the crop."""
    cells = cells / max(float(cells.max()), 1e-12)
    cell_image = tensor_ijk_to_image(cells.astype(np.float32), cell_grid_image(crop.ras_grid, cell_voxels, cells.shape, crop.start_ijk))
    # ITK counts half a cell around the outer cell centres as inside, so the crop's edge voxels get a value.
    on_input = sitk.Resample(cell_image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    on_input = sitk.Clamp(on_input, sitk.sitkFloat32, 0.0, 1.0)
    on_input.CopyInformation(reference)
    return on_input


def _classify(model, description, reference, model_dir: Path, input_path, output_dir: Path, device, mask_path, point_ras,
              progress, timings, started) -> dict:
    """Classify one crop of ``reference`` and write ``attention.nrrd`` and ``result.json``."""
    stage_started = time.perf_counter()
    progress("preprocess", 0.0, "resampling to the RAS grid and cutting the crop")
    mask = read_image(mask_path) if mask_path is not None else None
    mode = None
    if mask is not None:
        mode = "mask"
    elif point_ras is not None:
        mode = "point"
    timings["preprocess"] = time.perf_counter() - stage_started

    stage_started = time.perf_counter()
    progress("infer", 0.0, "classifying the crop")
    probabilities, cells, crop = classify_image(model, description, reference, mask, point_ras, device, mode)
    progress("infer", 1.0, "classified the crop")
    timings["infer"] = time.perf_counter() - stage_started

    stage_started = time.perf_counter()
    progress("write", 0.0, "resampling the attention onto the input grid")
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dagman-infer-", dir=output_dir))
    try:
        write_image_atomic(attention_on_input(cells, crop, reference, model.cell_voxels), staging / "attention.nrrd")
        timings["write"] = time.perf_counter() - stage_started
        timings["total"] = time.perf_counter() - started
        labels = description["labels"]
        best = int(np.argmax(probabilities))
        result = {
            "task": "classification",
            "model": {"name": description["name"], "sha256": description["weights"]["sha256"], "folder": str(model_dir.resolve())},
            "model_sha256": description["weights"]["sha256"],
            "input": str(input_path),
            "device": str(device),
            "dagman_version": __version__,
            "labels": labels,
            "probabilities": {label["name"]: round(float(probabilities[label["value"]]), 6) for label in labels},
            "predicted": {"value": best, "name": next(label["name"] for label in labels if label["value"] == best)},
            "crop": crop.describe(),
            "outputs": {"attention": "attention.nrrd"},
            "timings_s": {key: round(value, 3) for key, value in timings.items()},
        }
        (staging / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        for name in ("attention.nrrd", "result.json"):
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    progress("done", 1.0, f"wrote results to {output_dir}")
    return result
