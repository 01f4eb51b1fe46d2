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
