"""Build proxy classification tasks from the real CT scans: organ, tumor and body region crops.

The real CT data folder (by default ``../shared/data/ct``, with a ``manifest.json``) has no malignancy
labels, so classifiers are exercised on proxy tasks cut from its scans:

- ``organs``: crops centred at TotalSegmentator organ centroids (liver, spleen, stomach, vertebrae).
- ``tumor``: lung tumor versus non-tumor crops of the two pyradiomics chest CTs.
- ``region``: head, chest and abdomen crops centred at random points inside the body.

Each crop is a cube of ``size_mm`` cut by index from its source scan, so it keeps the scan's spacing,
origin and direction. Where the cube leaves the scan it is padded with -1024 HU. Each task writes
``OUTPUT/TASK/crops/*.nrrd``, lesion or organ masks in ``OUTPUT/TASK/masks/*.nrrd`` and one
``OUTPUT/TASK/datalist.json`` whose paths are relative to its folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import numbers
import os
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import SimpleITK as sitk

from dagman_core.data.io import read_image, same_geometry, write_image_atomic

logger = logging.getLogger(__name__)

TASKS = ("organs", "tumor", "region")
DEFAULT_DATA_DIR = Path("..") / "shared" / "data" / "ct"
LABEL_NAMES_FILE = "totalsegmentator/total_task_label_names.json"

BACKGROUND_HU = -1024
BODY_HU = -500
BODY_GRID_MM = 2.0


@dataclass(frozen=True)
class Scan:
    """A scan of the CT data folder: image path, optional label map path (relative to the folder) and patient."""

    id: str
    image: str
    group: str
    labels: str | None = None


# Ids are those of manifest.json. The crop30 scan is slices 82-111 of ts_abdomen_3mm, so both share a group.
SCANS = {
    scan.id: scan
    for scan in (
        Scan(
            "ts_abdomen_3mm", "totalsegmentator/abdomen_3mm/ct.nii.gz", "ts_abdomen_3mm",
            "totalsegmentator/abdomen_3mm/seg_total_fast_multilabel.nii.gz",
        ),
        Scan(
            "ts_abdomen_3mm_crop30", "totalsegmentator/abdomen_3mm_crop30/ct.nii.gz", "ts_abdomen_3mm",
            "totalsegmentator/abdomen_3mm_crop30/seg_total_multilabel.nii.gz",
        ),
        Scan(
            "ts_chest_abdomen_dicom", "totalsegmentator/chest_abdomen_dicom/dicom", "ts_chest_abdomen_dicom",
            "totalsegmentator/chest_abdomen_dicom/seg_total_multilabel.nii.gz",
        ),
        Scan(
            "pyradiomics_lung1", "pyradiomics_lung_tumor/lung1_image.nrrd", "pyradiomics_lung1",
            "pyradiomics_lung_tumor/lung1_label.nrrd",
        ),
        Scan(
            "pyradiomics_lung2", "pyradiomics_lung_tumor/lung2_image.nrrd", "pyradiomics_lung2",
            "pyradiomics_lung_tumor/lung2_label.nrrd",
        ),
        Scan("itkelastix_thorax", "itkelastix_thorax_ct/ct.nii.gz", "itkelastix_thorax"),
        Scan("invesalius_head", "invesalius_head_ct/ct.nii.gz", "invesalius_head"),
    )
}

# Organ classes and the TotalSegmentator 'total' label names merged into each. All four have at least
# MIN_ORGAN_ML in both labelled patients. The kidneys are left out because the chest_abdomen_dicom
# patient has none, and a patient-grouped split would then lose that class.
VERTEBRA_LEVELS = [f"C{level}" for level in range(1, 8)] + [f"T{level}" for level in range(1, 13)]
VERTEBRA_LEVELS += [f"L{level}" for level in range(1, 6)] + ["S1"]
ORGAN_CLASSES = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "stomach": ("stomach",),
    "vertebrae": tuple(f"vertebrae_{level}" for level in VERTEBRA_LEVELS),
}
ORGAN_SCANS = ("ts_abdomen_3mm", "ts_abdomen_3mm_crop30", "ts_chest_abdomen_dicom")
ORGAN_CROPS_PER_SCAN = 4
MIN_ORGAN_ML = 20.0

TUMOR_CLASSES = ("no tumor", "tumor")
TUMOR_SCANS = ("pyradiomics_lung1", "pyradiomics_lung2")
TUMOR_CROPS_PER_SCAN = 4

REGION_SCANS = {
    "head": ("invesalius_head",),
    "chest": ("itkelastix_thorax", "pyradiomics_lung1", "pyradiomics_lung2"),
    "abdomen": ("ts_abdomen_3mm", "ts_chest_abdomen_dicom"),
}
REGION_CROPS_PER_CLASS = 12


@dataclass
class Volume:
    """A loaded scan: the image and its voxels as a (K, J, I) array in HU."""

    scan: Scan
    image: sitk.Image
    array: np.ndarray


@dataclass(frozen=True)
class CropPlan:
    """One crop to cut: id, class index, source scan, centre (mm, physical) and the label ids of its mask."""

    id: str
    label: int
    scan: str
    centre_mm: tuple[float, float, float]
    mask_labels: tuple[int, ...] = ()


class ScanCache:
    """Load each scan of the data folder, its label map and its body voxels once per build."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.volumes: dict[str, Volume] = {}
        self.label_maps: dict[str, np.ndarray] = {}
        self.bodies: dict[str, np.ndarray] = {}

    def volume(self, scan_id: str) -> Volume:
        """Return the scan ``scan_id``, reading it on first use."""
        if scan_id not in self.volumes:
            scan = SCANS[scan_id]
            image = read_image(self.data_dir / scan.image)
            self.volumes[scan_id] = Volume(scan, image, sitk.GetArrayFromImage(image))
        return self.volumes[scan_id]

    def labels(self, scan_id: str) -> np.ndarray:
        """Return the label map of ``scan_id`` on its image grid as a (K, J, I) array, reading it on first use."""
        if scan_id in self.label_maps:
            return self.label_maps[scan_id]

        volume = self.volume(scan_id)
        if volume.scan.labels is None:
            raise ValueError(f"scan {scan_id} has no label map")

        # The chest_abdomen_dicom label map is stored with a flipped y axis, so it matches its image only
        # in physical space. Nearest-neighbour resampling puts it on the image grid.
        label_map = read_image(self.data_dir / volume.scan.labels)
        if not same_geometry(label_map, volume.image, tolerance=1e-3):
            logger.info("resampling the label map of %s onto its image grid (nearest neighbour)", scan_id)
            label_map = sitk.Resample(
                label_map, volume.image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, label_map.GetPixelID()
            )
        self.label_maps[scan_id] = sitk.GetArrayFromImage(label_map)
        return self.label_maps[scan_id]

    def body_voxels(self, scan_id: str) -> np.ndarray:
        """Return the (I, J, K) indices of the scan's body voxels, computed on first use."""
        if scan_id not in self.bodies:
            volume = self.volume(scan_id)
            self.bodies[scan_id] = body_voxels(volume.image, volume.array)
        return self.bodies[scan_id]


def build_proxy_tasks(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    tasks: Iterable[str] = TASKS,
    size_mm: float = 128.0,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the crops and datalist of each task under ``output_dir/TASK/``; return task -> datalist path.

    ``size_mm`` is the edge of the cubic crops in mm. ``seed`` fixes every random centre, so two builds
    with the same arguments write identical datalists. Rebuilding into the same folder replaces the
    crops and deletes those of an earlier build that the new datalist does not name.

    Raises:
        FileNotFoundError: ``data_dir`` or a scan that a task needs is missing.
        ValueError: an unknown task, a non-positive ``size_mm`` or a negative ``seed``.
    """
    data_dir = Path(data_dir)
    output_dir = Path(output_dir)
    tasks = check_arguments(tasks, size_mm, seed)
    check_inputs(data_dir, tasks)

    cache = ScanCache(data_dir)
    planners = {"organs": plan_organs, "tumor": plan_tumor, "region": plan_region}
    datalists = {}
    for task in tasks:
        # Each task draws from its own stream, so building one task alone gives the same crops.
        rng = np.random.default_rng([seed, TASKS.index(task)])
        classes, description, plans = planners[task](cache, size_mm, rng)
        description = f"{description} Crops are {size_mm:g} mm cubes, seed {seed}."
        log_class_counts(task, classes, plans)

        folder = output_dir / task
        entries = write_crops(cache, plans, size_mm, folder, task, progress)
        datalist = {
            "task": "classification",
            "name": task,
            "description": description,
            "classes": {str(index): name for index, name in enumerate(classes)},
            "training": entries,
        }
        datalists[task] = write_json_atomic(datalist, folder / "datalist.json")
        remove_stale_crops(folder, entries)
        logger.info("%s: %d crops, datalist %s", task, len(entries), datalists[task])
    return datalists


def check_arguments(tasks: Iterable[str], size_mm: float, seed: int) -> tuple[str, ...]:
    """Return the requested tasks without repeats, after checking them, ``size_mm`` and ``seed``."""
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(dict.fromkeys(tasks))
    unknown = [task for task in tasks if task not in TASKS]
    if unknown or not tasks:
        raise ValueError(f"invalid tasks {list(tasks)}: choose one or more of {', '.join(TASKS)}")

    is_number = isinstance(size_mm, numbers.Real) and not isinstance(size_mm, bool)
    if not (is_number and math.isfinite(size_mm) and size_mm > 0):
        raise ValueError(f"invalid size_mm {size_mm!r}: pass a positive crop edge in mm, e.g. 128")

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"invalid seed {seed!r}: pass a non-negative integer")
    return tasks


def task_scans(task: str) -> tuple[str, ...]:
    """Return the ids of the scans that ``task`` reads."""
    if task == "organs":
        return ORGAN_SCANS
    if task == "tumor":
        return TUMOR_SCANS
    return tuple(scan_id for scans in REGION_SCANS.values() for scan_id in scans)


def check_inputs(data_dir: Path, tasks: tuple[str, ...]) -> None:
    """Raise FileNotFoundError naming the path when the data folder or a file that a task needs is missing."""
    if not data_dir.is_dir():
        raise FileNotFoundError(
            f"CT data folder not found: {data_dir}; pass the folder that contains manifest.json "
            f"(--data, default {DEFAULT_DATA_DIR} relative to the current directory)"
        )

    for task in tasks:
        needed = [LABEL_NAMES_FILE] if task == "organs" else []
        for scan_id in task_scans(task):
            scan = SCANS[scan_id]
            needed.append(scan.image)
            if scan.labels is not None and task != "region":
                needed.append(scan.labels)
        for relative in needed:
            if not (data_dir / relative).exists():
                raise FileNotFoundError(
                    f"'{task}' task input not found: {data_dir / relative}; pass the complete CT data folder "
                    f"that contains manifest.json (--data), or leave out the '{task}' task (--tasks)"
                )


def plan_organs(cache: ScanCache, size_mm: float, rng: np.random.Generator) -> tuple[list[str], str, list[CropPlan]]:
    """Plan organ crops centred at each organ's centroid plus up to size_mm / 4 of random jitter.

    A centre that the jitter moves out of the scan is moved back onto its edge (see ``clamp_to_scan``).
    Every class gets ``ORGAN_CROPS_PER_SCAN`` crops times the fewest scans that any class appears in,
    spread evenly over the scans where the organ has at least ``MIN_ORGAN_ML`` ml.
    """
    label_ids = organ_label_ids(cache.data_dir / LABEL_NAMES_FILE)

    present: dict[str, list[str]] = {name: [] for name in ORGAN_CLASSES}
    anchors: dict[tuple[str, str], np.ndarray] = {}
    for scan_id in ORGAN_SCANS:
        volume = cache.volume(scan_id)
        voxel_ml = float(np.prod(volume.image.GetSpacing())) / 1000.0
        for name, ids in label_ids.items():
            mask = np.isin(cache.labels(scan_id), ids)
            volume_ml = int(mask.sum()) * voxel_ml
            if volume_ml < MIN_ORGAN_ML:
                logger.info("organs: %s left out of %s (%.1f ml, below %.0f ml)", name, scan_id, volume_ml, MIN_ORGAN_ML)
                continue
            present[name].append(scan_id)
            anchors[name, scan_id] = mask_anchor(volume.image, mask)

    absent = [name for name, scans in present.items() if not scans]
    if absent:
        raise ValueError(
            f"organ classes {absent} have no scan with at least {MIN_ORGAN_ML:g} ml; check the label maps in {cache.data_dir}"
        )

    per_class = ORGAN_CROPS_PER_SCAN * min(len(scans) for scans in present.values())
    plans = []
    for class_index, name in enumerate(ORGAN_CLASSES):
        for scan_id, count in zip(present[name], split_evenly(per_class, len(present[name]))):
            offsets = ball_offsets(rng, count, size_mm / 4)
            for number, offset in enumerate(offsets):
                centre = clamp_to_scan(cache.volume(scan_id).image, anchors[name, scan_id] + offset)
                plans.append(CropPlan(f"{scan_id}_{name}_{number}", class_index, scan_id, centre, label_ids[name]))

    description = (
        "Organ crops centred at TotalSegmentator organ centroids (model output, not ground truth) "
        "with up to a quarter of the crop edge of random jitter; masks are the organ's label."
    )
    return list(ORGAN_CLASSES), description, plans


def plan_tumor(cache: ScanCache, size_mm: float, rng: np.random.Generator) -> tuple[list[str], str, list[CropPlan]]:
    """Plan tumor and non-tumor crops of the pyradiomics chest CTs, ``TUMOR_CROPS_PER_SCAN`` of each per scan.

    Tumor crops are centred at the tumor centroid plus up to size_mm / 4 of jitter, kept inside the
    scan. Non-tumor crops are centred at random body voxels (HU > -500) at least size_mm / 2 from
    every tumor voxel, and their cube contains no tumor voxel.
    """
    from scipy.spatial import cKDTree

    plans = []
    for scan_id in TUMOR_SCANS:
        volume = cache.volume(scan_id)
        labels = cache.labels(scan_id)
        tumor = labels > 0
        if not tumor.any():
            raise ValueError(f"tumor mask of {scan_id} is empty: {cache.data_dir / volume.scan.labels}")
        tumor_ids = tuple(int(value) for value in np.unique(labels[tumor]))

        anchor = mask_anchor(volume.image, tumor)
        for number, offset in enumerate(ball_offsets(rng, TUMOR_CROPS_PER_SCAN, size_mm / 4)):
            centre = clamp_to_scan(volume.image, anchor + offset)
            plans.append(CropPlan(f"{scan_id}_tumor_{number}", 1, scan_id, centre, tumor_ids))

        tumor_points = index_to_physical(volume.image, np.argwhere(tumor)[:, ::-1])
        candidates = index_to_physical(volume.image, cache.body_voxels(scan_id))
        distances, _ = cKDTree(tumor_points).query(candidates)
        candidates = candidates[distances >= size_mm / 2]
        centres = []
        for candidate in candidates[rng.permutation(len(candidates))]:
            start, size = crop_box(volume.image, candidate, size_mm)
            if not cut_array(tumor, start, size, False).any():
                centres.append(candidate)
            if len(centres) == TUMOR_CROPS_PER_SCAN:
                break
        if len(centres) < TUMOR_CROPS_PER_SCAN:
            raise ValueError(
                f"only {len(centres)} of {TUMOR_CROPS_PER_SCAN} non-tumor crops of {size_mm:g} mm fit in {scan_id} "
                "away from its tumor; pass a smaller size_mm"
            )
        for number, centre in enumerate(centres):
            plans.append(CropPlan(f"{scan_id}_no_tumor_{number}", 0, scan_id, tuple(float(value) for value in centre)))

    description = (
        "Lung tumor versus non-tumor crops of the two pyradiomics chest CTs. Tumor crops are centred at the "
        "tumor with up to a quarter of the crop edge of jitter and carry the tumor mask; non-tumor crops are "
        "centred inside the body (HU > -500) at least half the crop edge from the tumor and contain no tumor voxel."
    )
    return list(TUMOR_CLASSES), description, plans


def plan_region(cache: ScanCache, size_mm: float, rng: np.random.Generator) -> tuple[list[str], str, list[CropPlan]]:
    """Plan ``REGION_CROPS_PER_CLASS`` head, chest and abdomen crops centred at random body voxels (HU > -500)."""
    plans = []
    for class_index, (name, scan_ids) in enumerate(REGION_SCANS.items()):
        for scan_id, count in zip(scan_ids, split_evenly(REGION_CROPS_PER_CLASS, len(scan_ids))):
            volume = cache.volume(scan_id)
            candidates = cache.body_voxels(scan_id)
            chosen = candidates[rng.choice(len(candidates), size=count, replace=False)]
            for number, centre in enumerate(index_to_physical(volume.image, chosen)):
                centre = tuple(float(value) for value in centre)
                plans.append(CropPlan(f"{scan_id}_{name}_{number}", class_index, scan_id, centre))

    description = (
        "Body region crops centred at random points inside the body (HU > -500): head from the InVesalius "
        "head CT, chest from the ITKElastix thorax and pyradiomics CTs, abdomen from the TotalSegmentator "
        "abdomen and chest-abdomen CTs."
    )
    return list(REGION_SCANS), description, plans


def organ_label_ids(path: Path) -> dict[str, tuple[int, ...]]:
    """Return the TotalSegmentator 'total' label ids merged into each organ class, read from ``path``."""
    names = json.loads(path.read_text(encoding="utf-8"))
    if "total" not in names:
        raise ValueError(f"label name file {path} has no 'total' task; expected {{'total': {{'1': 'spleen', ...}}}}")
    ids_by_name = {name: int(label) for label, name in names["total"].items()}

    label_ids = {}
    for organ, label_names in ORGAN_CLASSES.items():
        missing = [name for name in label_names if name not in ids_by_name]
        if missing:
            raise ValueError(f"label names {missing} of organ class '{organ}' are not in {path}")
        label_ids[organ] = tuple(ids_by_name[name] for name in label_names)
    return label_ids


def split_evenly(total: int, parts: int) -> list[int]:
    """Return ``parts`` counts that sum to ``total`` and differ by at most one, larger counts first."""
    base, extra = divmod(total, parts)
    return [base + (1 if index < extra else 0) for index in range(parts)]


def ball_offsets(rng: np.random.Generator, count: int, radius_mm: float) -> np.ndarray:
    """Draw ``count`` offsets (mm) uniformly from a ball of ``radius_mm``, one per row."""
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    lengths = radius_mm * rng.random(count) ** (1.0 / 3.0)
    return directions * lengths[:, None]


def index_to_physical(image: sitk.Image, indices: np.ndarray) -> np.ndarray:
    """Return the physical points (mm) of (I, J, K) indices given one per row; indices may lie outside the image."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    scaled = np.asarray(indices, dtype=float) * np.array(image.GetSpacing())
    return np.array(image.GetOrigin()) + scaled @ direction.T


def physical_to_index(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """Return the continuous (I, J, K) indices of physical points (mm) given one per row."""
    direction = np.array(image.GetDirection()).reshape(3, 3)
    offsets = np.atleast_2d(points) - np.array(image.GetOrigin())
    return offsets @ np.linalg.inv(direction).T / np.array(image.GetSpacing())


def clamp_to_scan(image: sitk.Image, point_mm: np.ndarray) -> tuple[float, float, float]:
    """Return ``point_mm`` moved onto the nearest point of the scan's voxel grid box when it lies outside.

    Thin scans (20 slices of 2 mm) would otherwise get jittered crops whose centre slice is all padding.
    Clamping only shortens the offset from an anchor inside the scan, so the anchor stays within the jitter.
    """
    index = physical_to_index(image, point_mm)[0]
    index = np.clip(index, 0, np.array(image.GetSize()) - 1)
    return tuple(float(value) for value in index_to_physical(image, index[None])[0])


def mask_anchor(image: sitk.Image, mask: np.ndarray) -> np.ndarray:
    """Return the centroid (mm) of a (K, J, I) mask, or the mask voxel nearest to it when it lies outside.

    A curved organ such as the stomach can have its centroid outside itself, and the nearest voxel
    keeps the organ at the centre of its crops.
    """
    points = index_to_physical(image, np.argwhere(mask)[:, ::-1])
    centroid = points.mean(axis=0)

    index = np.round(physical_to_index(image, centroid)[0]).astype(int)
    inside = np.all(index >= 0) and np.all(index < np.array(image.GetSize()))
    if inside and mask[index[2], index[1], index[0]]:
        return centroid
    return points[np.argmin(((points - centroid) ** 2).sum(axis=1))]


def body_voxels(image: sitk.Image, array: np.ndarray) -> np.ndarray:
    """Return the (I, J, K) indices of body voxels: HU > -500 in the largest connected component.

    The search runs on every n-th voxel along each axis, so the grid step is about ``BODY_GRID_MM``
    (2 mm). The returned indices are voxels of the full grid. Keeping only the largest component
    drops the table and other objects outside the body.
    """
    from scipy import ndimage

    stride = np.array([max(1, int(BODY_GRID_MM // spacing)) for spacing in image.GetSpacing()])
    grid = array[:: stride[2], :: stride[1], :: stride[0]] > BODY_HU
    components, count = ndimage.label(grid)
    if count == 0:
        raise ValueError(f"no voxel above {BODY_HU} HU in a scan of size {image.GetSize()}; is it a CT in HU?")

    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    body = components == int(np.argmax(sizes))
    return np.argwhere(body)[:, ::-1] * stride


def crop_box(image: sitk.Image, centre_mm: np.ndarray, size_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the start index and size (I, J, K) of the cube of edge ``size_mm`` centred at ``centre_mm``.

    Each axis gets round(size_mm / spacing) voxels, so the extent is within half a voxel of ``size_mm``.
    """
    spacing = np.array(image.GetSpacing())
    size = np.maximum(1, np.round(size_mm / spacing)).astype(int)
    centre = physical_to_index(image, np.asarray(centre_mm))[0]
    start = np.round(centre - (size - 1) / 2).astype(int)
    return start, size


def cut_array(array: np.ndarray, start: np.ndarray, size: np.ndarray, fill) -> np.ndarray:
    """Return the (K, J, I) block of ``array`` at index ``start`` (I, J, K) and ``size``, with ``fill`` outside it."""
    block = np.full(tuple(size[::-1]), fill, dtype=array.dtype)
    shape = np.array(array.shape[::-1])
    low = np.maximum(start, 0)
    high = np.minimum(start + size, shape)
    if np.any(high <= low):
        return block

    inner_low = low - start
    inner_high = high - start
    block[inner_low[2] : inner_high[2], inner_low[1] : inner_high[1], inner_low[0] : inner_high[0]] = array[
        low[2] : high[2], low[1] : high[1], low[0] : high[0]
    ]
    return block


def crop_image(image: sitk.Image, block: np.ndarray, start: np.ndarray) -> sitk.Image:
    """Wrap a block cut at index ``start`` as an image with the source's spacing, direction and the origin of that index."""
    crop = sitk.GetImageFromArray(block)
    crop.SetSpacing(image.GetSpacing())
    crop.SetDirection(image.GetDirection())
    crop.SetOrigin(tuple(float(value) for value in index_to_physical(image, start[None])[0]))
    return crop


def write_crops(cache: ScanCache, plans: list[CropPlan], size_mm: float, folder: Path, task: str, progress: bool) -> list[dict]:
    """Cut and write each planned crop (and its mask) as NRRD under ``folder``; return the datalist entries."""
    from tqdm import tqdm

    entries = []
    with tqdm(total=len(plans), desc=f"{task} crops", unit="crop", disable=not progress, file=sys.stderr) as bar:
        for plan in plans:
            volume = cache.volume(plan.scan)
            start, size = crop_box(volume.image, np.array(plan.centre_mm), size_mm)
            block = cut_array(volume.array, start, size, BACKGROUND_HU)
            write_image_atomic(crop_image(volume.image, block, start), folder / "crops" / f"{plan.id}.nrrd")
            entry = {"image": f"crops/{plan.id}.nrrd"}

            if plan.mask_labels:
                labels = cut_array(cache.labels(plan.scan), start, size, 0)
                mask = np.isin(labels, plan.mask_labels).astype(np.uint8)
                write_image_atomic(crop_image(volume.image, mask, start), folder / "masks" / f"{plan.id}.nrrd")
                entry["mask"] = f"masks/{plan.id}.nrrd"

            entry.update({"class": plan.label, "id": plan.id, "group": volume.scan.group})
            entries.append(entry)
            bar.update()
    return entries


def log_class_counts(task: str, classes: list[str], plans: list[CropPlan]) -> None:
    """Log how many crops each class of ``task`` gets."""
    counts = Counter(plan.label for plan in plans)
    summary = ", ".join(f"{name} {counts[index]}" for index, name in enumerate(classes))
    logger.info("%s: crops per class: %s", task, summary)


def write_json_atomic(content: dict, path: Path) -> Path:
    """Write ``content`` as indented JSON to ``path`` through a temporary file in the same folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(json.dumps(content, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def remove_stale_crops(folder: Path, entries: list[dict]) -> None:
    """Delete NRRD files in ``folder``'s crops and masks folders that no datalist entry names."""
    named = {entry[key] for entry in entries for key in ("image", "mask") if key in entry}
    for subfolder in ("crops", "masks"):
        for path in sorted((folder / subfolder).glob("*.nrrd")):
            if f"{subfolder}/{path.name}" not in named:
                logger.debug("removing %s, left by an earlier build", path)
                path.unlink()


def register(commands) -> argparse.ArgumentParser:
    """Add the ``proxy-tasks`` subcommand to an argparse subparsers object; return its parser."""
    parser = commands.add_parser(
        "proxy-tasks",
        help="cut proxy classification tasks (organs, tumor, body region) from the real CT scans",
        description="Cut cubic crops of the real CT scans into classification datalists, one folder per task.",
    )
    parser.add_argument(
        "--data", default=str(DEFAULT_DATA_DIR),
        help=f"folder of the real CT scans, with manifest.json (default: {DEFAULT_DATA_DIR}, relative to the current directory)",
    )
    parser.add_argument("--output", required=True, help="folder to write; each task goes to OUTPUT/TASK/ with its datalist.json")
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=list(TASKS), metavar="TASK",
        help=f"tasks to build, one or more of {', '.join(TASKS)} (default: all)",
    )
    parser.add_argument("--size-mm", type=float, default=128.0, help="edge of the cubic crops in mm (default: 128)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crop centres (default: 0)")
    parser.set_defaults(handler=run_command)
    return parser


def run_command(arguments: argparse.Namespace) -> int:
    """Build the tasks named on the command line and print where each datalist went."""
    datalists = build_proxy_tasks(arguments.data, arguments.output, arguments.tasks, arguments.size_mm, arguments.seed)
    for task, path in datalists.items():
        print(f"{task}: {path}")
    return 0
