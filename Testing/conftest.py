"""Shared fixtures: the real CT folder and a tiny model bundle built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
CT_DATA = Path(os.environ.get("DAGMAN_TEST_DATA", REPOSITORY.parent / "shared" / "data" / "ct"))


@pytest.fixture(scope="session")
def ct_data() -> Path:
    """The folder of real CT scans; tests that need it are skipped with the reason when it is absent."""
    if not (CT_DATA / "pyradiomics_lung_tumor" / "lung2_image.nrrd").exists():
        pytest.skip(f"real CT data not found at {CT_DATA} (set DAGMAN_TEST_DATA to the folder holding manifest.json)")
    return CT_DATA


@pytest.fixture(scope="session")
def tiny_model_bundle(tmp_path_factory) -> Path:
    """An untrained tiny_cpu lung tumor bundle: real weights and model.json, random (seeded) values."""
    from dagman_core.bundle import write_random_bundle

    return write_random_bundle(tmp_path_factory.mktemp("bundle") / "tiny model", preset="tiny_cpu", seed=0)


@pytest.fixture(scope="session")
def trained_tumor_bundle(ct_data: Path, tmp_path_factory) -> Path:
    """A tiny_cpu model fine-tuned for a few minutes on a block of lung2 around its tumor.

    It segments that tumor well enough to compare results across storage variants of the scan; it is
    not a useful model otherwise.
    """
    from dagman_core.config import load_config
    from dagman_train.export import export_run
    from dagman_train.finetune import finetune_segmentation
    from dagman_train.pretrain import pretrain

    folder = tmp_path_factory.mktemp("trained")
    datalist = write_tumor_block(ct_data, folder)

    pretrain(load_config("tiny_cpu"), datalist, folder / "pretrain", max_steps=1, show_progress=False)
    finetune_segmentation(folder / "pretrain", datalist, folder / "finetune", max_steps=TRAINED_STEPS, show_progress=False)
    return export_run(folder / "finetune", folder / "model")


# A 260 x 260 x 30 voxel block of lung2 (0.63 x 0.63 x 5 mm) that contains its tumor.
LUNG2_TUMOR_BLOCK = (slice(250, 510), slice(150, 410), slice(10, 40))
TRAINED_STEPS = 150


def write_tumor_block(ct_data: Path, folder: Path) -> Path:
    """Write lung2's tumor block and its label as NRRD into ``folder``; return a datalist naming them."""
    import json

    import SimpleITK as sitk

    for name in ("image", "label"):
        image = sitk.ReadImage(str(ct_data / "pyradiomics_lung_tumor" / f"lung2_{name}.nrrd"))
        sitk.WriteImage(image[LUNG2_TUMOR_BLOCK], str(folder / f"block_{name}.nrrd"))
    datalist = folder / "datalist.json"
    datalist.write_text(json.dumps({
        "labels": {"1": "Lung tumor"},
        "training": [{"image": "block_image.nrrd", "label": "block_label.nrrd"}],
    }))
    return datalist
