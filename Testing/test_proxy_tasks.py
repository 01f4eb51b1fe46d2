"""Proxy classification tasks cut from the real CT scans: files, geometry, centres, balance, seeding and CLI."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from dagman_core.data.io import read_image
from dagman_train import proxy_tasks
from dagman_train.proxy_tasks import SCANS, TASKS, build_proxy_tasks, organ_label_ids, register

# A 64 mm crop edge keeps one build of all tasks at about 5 s (measured on two CPU cores).
SIZE_MM = 64.0
SCAN_IDS_LONGEST_FIRST = sorted(SCANS, key=len, reverse=True)


@pytest.fixture(scope="module")
def built(ct_data: Path, tmp_path_factory) -> dict[str, Path]:
    """Build all three tasks once with seed 0; return task -> datalist path."""
    return build_proxy_tasks(ct_data, tmp_path_factory.mktemp("proxy"), size_mm=SIZE_MM, seed=0, progress=False)


@pytest.fixture(scope="module")
def sources(ct_data: Path) -> dict[str, sitk.Image]:
    """Read every source scan once, keyed by scan id."""
    return {scan_id: read_image(ct_data / scan.image) for scan_id, scan in SCANS.items()}


def load(datalist: Path) -> dict:
    return json.loads(datalist.read_text(encoding="utf-8"))


def source_of(entry: dict) -> str:
    """Return the id of the scan a crop was cut from, which starts the crop's id."""
    return next(scan_id for scan_id in SCAN_IDS_LONGEST_FIRST if entry["id"].startswith(f"{scan_id}_"))


def on_crop_grid(source: sitk.Image, crop: sitk.Image, fill: float) -> np.ndarray:
    """Return the source sampled (nearest neighbour) at the crop's voxels, as a (K, J, I) array."""
    resampled = sitk.Resample(source, crop, sitk.Transform(), sitk.sitkNearestNeighbor, fill, source.GetPixelID())
    return sitk.GetArrayFromImage(resampled)


def centre_block(array: np.ndarray, half_width: np.ndarray) -> np.ndarray:
    """Return the block of a (K, J, I) array within ``half_width`` voxels (I, J, K) of its centre."""
    centre = (np.array(array.shape) - 1) / 2
    low = np.floor(centre - half_width[::-1]).astype(int).clip(0)
    high = np.ceil(centre + half_width[::-1]).astype(int) + 1
    return array[low[0] : high[0], low[1] : high[1], low[2] : high[2]]


def test_datalist_format_and_classes(built: dict[str, Path]):
    assert list(built) == list(TASKS)
    expected_classes = {
        "organs": {"0": "liver", "1": "spleen", "2": "stomach", "3": "vertebrae"},
        "tumor": {"0": "no tumor", "1": "tumor"},
        "region": {"0": "head", "1": "chest", "2": "abdomen"},
    }
    for task, path in built.items():
        content = load(path)
        assert path == path.parent.parent / task / "datalist.json"
        assert list(content) == ["task", "name", "description", "classes", "training"]
        assert content["task"] == "classification"
        assert content["name"] == task
        assert content["classes"] == expected_classes[task]
        for entry in content["training"]:
            assert set(entry) <= {"image", "mask", "class", "id", "group"}, entry
            assert entry["image"] == f"crops/{entry['id']}.nrrd"
            assert str(entry["class"]) in content["classes"]
            assert entry["group"] == SCANS[source_of(entry)].group


def test_crop_files_exist_and_read(built: dict[str, Path]):
    for path in built.values():
        for entry in load(path)["training"]:
            for key in ("image", "mask"):
                if key in entry:
                    assert not Path(entry[key]).is_absolute()
                    image = sitk.ReadImage(str(path.parent / entry[key]))
                    assert image.GetDimension() == 3


def test_crops_keep_source_geometry(built: dict[str, Path], sources: dict[str, sitk.Image]):
    for path in built.values():
        for entry in load(path)["training"]:
            source = sources[source_of(entry)]
            crop = sitk.ReadImage(str(path.parent / entry["image"]))
            assert np.allclose(crop.GetSpacing(), source.GetSpacing(), atol=1e-6), entry["id"]
            assert np.allclose(crop.GetDirection(), source.GetDirection(), atol=1e-6), entry["id"]

            extent = np.array(crop.GetSize()) * np.array(crop.GetSpacing())
            assert np.all(np.abs(extent - SIZE_MM) <= np.array(crop.GetSpacing())), (entry["id"], extent)

            # Voxels equal to the source resampled onto the crop grid prove the origin, and outside the
            # scan they must be padding.
            expected = on_crop_grid(source, crop, proxy_tasks.BACKGROUND_HU)
            assert np.array_equal(sitk.GetArrayFromImage(crop), expected), entry["id"]


def test_organ_masks_match_labels(built: dict[str, Path], ct_data: Path):
    label_ids = organ_label_ids(ct_data / proxy_tasks.LABEL_NAMES_FILE)
    classes = load(built["organs"])["classes"]
    label_maps = {}
    for entry in load(built["organs"])["training"]:
        scan = SCANS[source_of(entry)]
        if scan.id not in label_maps:
            label_maps[scan.id] = read_image(ct_data / scan.labels)
        mask = sitk.ReadImage(str(built["organs"].parent / entry["mask"]))
        mask_array = sitk.GetArrayFromImage(mask)

        organ = classes[str(entry["class"])]
        expected = np.isin(on_crop_grid(label_maps[scan.id], mask, 0), label_ids[organ])
        assert np.array_equal(mask_array > 0, expected), entry["id"]

        # The jitter is at most a quarter of the crop edge, so the organ reaches the central half.
        half_width = SIZE_MM / 4 / np.array(mask.GetSpacing()) + 1
        assert centre_block(mask_array, half_width).any(), f"{entry['id']}: no {organ} near the crop centre"


def test_tumor_crops_match_labels(built: dict[str, Path], ct_data: Path):
    for entry in load(built["tumor"])["training"]:
        label_map = read_image(ct_data / SCANS[source_of(entry)].labels)
        crop = sitk.ReadImage(str(built["tumor"].parent / entry["image"]))
        tumor = on_crop_grid(label_map, crop, 0) > 0
        if entry["class"] == 0:
            assert "mask" not in entry, entry["id"]
            assert not tumor.any(), f"{entry['id']}: a non-tumor crop holds tumor voxels"
            continue

        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(built["tumor"].parent / entry["mask"])))
        assert np.array_equal(mask > 0, tumor), entry["id"]
        half_width = SIZE_MM / 4 / np.array(crop.GetSpacing()) + 1
        assert centre_block(mask, half_width).any(), f"{entry['id']}: no tumor near the crop centre"


def test_region_centres_inside_body(built: dict[str, Path]):
    for entry in load(built["region"])["training"]:
        crop = sitk.GetArrayFromImage(sitk.ReadImage(str(built["region"].parent / entry["image"])))
        centre = centre_block(crop, np.full(3, 0.5))
        assert centre.max() > proxy_tasks.BODY_HU, f"{entry['id']}: centre voxels {centre.ravel()} are not body"


def test_classes_are_balanced(built: dict[str, Path]):
    for task, path in built.items():
        content = load(path)
        counts = Counter(entry["class"] for entry in content["training"])
        assert sorted(counts) == list(range(len(content["classes"]))), task
        assert len(set(counts.values())) == 1, f"{task}: unbalanced classes {counts}"

    organ_entries = load(built["organs"])["training"]
    for group in ("ts_abdomen_3mm", "ts_chest_abdomen_dicom"):
        per_class = Counter(entry["class"] for entry in organ_entries if entry["group"] == group)
        assert sorted(per_class) == [0, 1, 2, 3], (group, per_class)
        assert min(per_class.values()) >= 4, (group, per_class)
    crop30 = [entry for entry in organ_entries if entry["id"].startswith("ts_abdomen_3mm_crop30_")]
    assert crop30 and {entry["group"] for entry in crop30} == {"ts_abdomen_3mm"}


def test_same_seed_same_datalist(built: dict[str, Path], ct_data: Path, tmp_path: Path):
    again = build_proxy_tasks(ct_data, tmp_path, size_mm=SIZE_MM, seed=0, progress=False)
    for task in TASKS:
        assert again[task].read_text(encoding="utf-8") == built[task].read_text(encoding="utf-8"), task


def test_rebuild_replaces_old_crops(built: dict[str, Path], ct_data: Path, tmp_path: Path):
    other = build_proxy_tasks(ct_data, tmp_path, tasks=("tumor",), size_mm=SIZE_MM, seed=1, progress=False)
    assert other["tumor"].read_text(encoding="utf-8") != built["tumor"].read_text(encoding="utf-8")
    (tmp_path / "tumor" / "crops" / "left_over.nrrd").write_bytes(b"")

    rebuilt = build_proxy_tasks(ct_data, tmp_path, tasks=("tumor",), size_mm=SIZE_MM, seed=0, progress=False)
    assert list(rebuilt) == ["tumor"]
    assert rebuilt["tumor"].read_text(encoding="utf-8") == built["tumor"].read_text(encoding="utf-8")

    entries = load(rebuilt["tumor"])["training"]
    named = {entry[key] for entry in entries for key in ("image", "mask") if key in entry}
    written = {f"{path.parent.name}/{path.name}" for path in (tmp_path / "tumor").glob("*/*")}
    assert written == named


def test_cli_subcommand_builds_task(ct_data: Path, tmp_path: Path, capsys):
    parser = argparse.ArgumentParser(prog="dagman")
    register(parser.add_subparsers(dest="command", required=True))

    defaults = parser.parse_args(["proxy-tasks", "--output", str(tmp_path)])
    assert Path(defaults.data) == Path("../shared/data/ct")
    assert list(defaults.tasks) == list(TASKS)
    assert defaults.size_mm == 128.0
    assert defaults.seed == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["proxy-tasks", "--output", str(tmp_path), "--tasks", "lungs"])

    arguments = parser.parse_args([
        "proxy-tasks", "--data", str(ct_data), "--output", str(tmp_path),
        "--tasks", "tumor", "--size-mm", str(SIZE_MM), "--seed", "3",
    ])
    assert arguments.handler(arguments) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == f"tumor: {tmp_path / 'tumor' / 'datalist.json'}"
    assert load(tmp_path / "tumor" / "datalist.json")["name"] == "tumor"


def test_missing_data_names_path(tmp_path: Path):
    missing = tmp_path / "no such folder"
    with pytest.raises(FileNotFoundError, match="no such folder.*manifest.json"):
        build_proxy_tasks(missing, tmp_path / "out", progress=False)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"lung1_image\.nrrd.*--tasks"):
        build_proxy_tasks(empty, tmp_path / "out", tasks=("tumor",), progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"tasks": ("lungs",)}, "invalid tasks"),
        ({"tasks": ()}, "invalid tasks"),
        ({"size_mm": 0.0}, "invalid size_mm"),
        ({"size_mm": float("nan")}, "invalid size_mm"),
        ({"seed": -1}, "invalid seed"),
    ],
)
def test_invalid_arguments_raise(ct_data: Path, tmp_path: Path, arguments: dict, message: str):
    with pytest.raises(ValueError, match=message):
        build_proxy_tasks(ct_data, tmp_path, progress=False, **arguments)
