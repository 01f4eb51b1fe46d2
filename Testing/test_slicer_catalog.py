"""The model catalogue: the shipped models.json, adding bundle folders, the cache folder and checksums."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

import slicer_fixtures  # noqa: F401 (puts the module folders on sys.path)
from DAGMaNLib.catalog import (
    CATALOGUE_PATH,
    CACHE_FOLDER_KEY,
    USER_MODELS_KEY,
    CatalogueError,
    ChecksumMismatch,
    MemorySettings,
    ModelCatalog,
    load_catalogue,
    sha256_of_file,
)
from dagman_train.cli import main as dagman_main


def write_catalogue(path: Path, models: list[dict]) -> Path:
    path.write_text(json.dumps({"format_version": 1, "models": models}), encoding="utf-8")
    return path


def catalogue_entry_of(bundle: Path, url: str) -> dict:
    """Return the entry that ``dagman catalogue-entry`` prints for ``bundle``."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert dagman_main(["catalogue-entry", str(bundle), "--url", url, "--licence", "Apache-2.0", "--id", "lung-demo"]) == 0
    return json.loads(printed.getvalue())


@pytest.fixture
def bundle(tiny_model_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the random tiny bundle, free to damage."""
    return Path(shutil.copytree(tiny_model_bundle, tmp_path / "downloads" / "bundle"))


def test_shipped_catalogue_is_valid():
    entries = load_catalogue(CATALOGUE_PATH)

    assert len({entry.id for entry in entries}) == len(entries)
    for entry in entries:
        assert entry.url
        assert entry.licence
        assert entry.labels


def test_catalogue_entry_command_records_the_weights_checksum(bundle):
    entry = catalogue_entry_of(bundle, "https://example.org/lung-demo.zip")

    assert entry["sha256"] == sha256_of_file(bundle / "model.safetensors")
    assert entry["task"] == "segmentation"
    assert entry["labels"][0]["name"] == "Lung tumor"
    assert entry["labels"][0]["terminology"]["type"]["code"] == "108369006"


def test_published_model_install_and_verify(bundle, tmp_path):
    catalogue = write_catalogue(tmp_path / "models.json", [catalogue_entry_of(bundle, "https://example.org/lung-demo.zip")])
    catalog = ModelCatalog(MemorySettings(), tmp_path / "cache", catalogue)

    (entry,) = catalog.entries()
    assert not entry.installed
    assert entry.display_name().endswith("(not installed)")
    assert entry.describe() == "Segmentation: Lung tumor; licence Apache-2.0; version 0.1.0; get it from https://example.org/lung-demo.zip"
    with pytest.raises(CatalogueError, match="not installed.*https://example.org/lung-demo.zip"):
        catalog.verified_folder("lung-demo")

    added = catalog.add_folder(bundle)

    assert added.id == "lung-demo"
    assert added.source == "catalogue"
    assert catalog.verified_folder("lung-demo") == tmp_path / "cache" / "lung-demo"
    assert sorted(path.name for path in (tmp_path / "cache").iterdir()) == ["lung-demo"]
    assert catalog.settings.value(USER_MODELS_KEY) in (None, "[]")


def test_damaged_weights_are_refused_before_use(bundle, tmp_path):
    catalogue = write_catalogue(tmp_path / "models.json", [catalogue_entry_of(bundle, "https://example.org/m.zip")])
    catalog = ModelCatalog(MemorySettings(), tmp_path / "cache", catalogue)
    folder = catalog.add_folder(bundle).folder

    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))

    with pytest.raises(ChecksumMismatch, match="damaged or was replaced"):
        catalog.verified_folder("lung-demo")


def test_user_model_is_kept_in_the_settings(bundle, tmp_path):
    settings = MemorySettings()
    catalog = ModelCatalog(settings, tmp_path / "cache", write_catalogue(tmp_path / "models.json", []))

    added = catalog.add_folder(bundle)

    sha256 = sha256_of_file(bundle / "model.safetensors")
    assert added.source == "user"
    assert added.id == f"untrained-tiny-cpu-self-test-{sha256[:8]}"
    assert added.labels[0].terminology["region"]["meaning"] == "Lung"

    # A new session (a new catalogue object over the same settings) still lists it.
    reopened = ModelCatalog(settings, tmp_path / "cache", write_catalogue(tmp_path / "models.json", []))
    assert [entry.id for entry in reopened.entries()] == [added.id]
    assert reopened.verified_folder(added.id) == tmp_path / "cache" / added.id

    shutil.rmtree(tmp_path / "cache" / added.id)
    (missing,) = reopened.entries()
    assert not missing.installed
    assert missing.describe().endswith("bundle missing from the cache folder; add it again")
    with pytest.raises(CatalogueError, match="no longer in .*add it again"):
        reopened.verified_folder(added.id)

    reopened.remove(added.id)
    assert reopened.entries() == []
    assert not (tmp_path / "cache" / added.id).exists()


def test_bundle_checksum_mismatch_rejected(bundle, tmp_path):
    description = json.loads((bundle / "model.json").read_text())
    description["weights"]["sha256"] = "0" * 64
    (bundle / "model.json").write_text(json.dumps(description))
    catalog = ModelCatalog(MemorySettings(), tmp_path / "cache", write_catalogue(tmp_path / "models.json", []))

    with pytest.raises(ChecksumMismatch, match="records 0000"):
        catalog.add_folder(bundle)

    assert catalog.entries() == []
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


def test_folder_without_model_json_is_refused(tmp_path):
    catalog = ModelCatalog(MemorySettings(), tmp_path / "cache", write_catalogue(tmp_path / "models.json", []))
    (tmp_path / "not-a-bundle").mkdir()

    with pytest.raises(CatalogueError, match="not-a-bundle is not a DAGMaN model bundle"):
        catalog.add_folder(tmp_path / "not-a-bundle")


def test_interrupted_copy_leaves_nothing_in_the_cache(bundle, tmp_path, monkeypatch):
    catalog = ModelCatalog(MemorySettings(), tmp_path / "cache", write_catalogue(tmp_path / "models.json", []))
    real_copy = shutil.copy2
    copied = []

    def copy_then_fail(source, target):
        if copied:
            raise OSError(28, "No space left on device")
        copied.append(source)
        return real_copy(source, target)

    monkeypatch.setattr(shutil, "copy2", copy_then_fail)

    with pytest.raises(OSError, match="No space left"):
        catalog.add_folder(bundle)

    assert list((tmp_path / "cache").iterdir()) == []
    assert catalog.entries() == []


def test_changing_the_cache_folder(bundle, tmp_path):
    settings = MemorySettings()
    catalog = ModelCatalog(settings, tmp_path / "cache", write_catalogue(tmp_path / "models.json", []))
    catalog.set_cache_folder(tmp_path / "big-disk" / "dagman-models")

    added = catalog.add_folder(bundle)

    assert settings.value(CACHE_FOLDER_KEY) == str(tmp_path / "big-disk" / "dagman-models")
    assert added.folder == tmp_path / "big-disk" / "dagman-models" / added.id

    (tmp_path / "a-file").write_text("")
    with pytest.raises(CatalogueError, match="Cannot use .*a-file"):
        catalog.set_cache_folder(tmp_path / "a-file")


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ([{"id": "a", "title": "A", "task": "segmentation", "sha256": "a" * 64}] * 2, "appears twice"),
        ([{"id": "a", "title": "A", "task": "segmentation", "sha256": "ABC"}], "invalid sha256 'ABC'; expected 64 lowercase hex"),
        ([{"id": "a", "title": "A", "task": "detection", "sha256": "a" * 64}], "task 'detection' is invalid"),
        ([{"id": "../a", "title": "A", "task": "segmentation", "sha256": "a" * 64}], "invalid id '../a'; use only letters"),
        ([{"id": "a", "task": "segmentation", "sha256": "a" * 64}], "missing title"),
    ],
)
def test_invalid_catalogue_entries_are_named(tmp_path, models, message):
    with pytest.raises(CatalogueError, match=message):
        load_catalogue(write_catalogue(tmp_path / "models.json", models))


def test_newer_catalogue_format_rejected(tmp_path):
    path = tmp_path / "models.json"
    path.write_text(json.dumps({"format_version": 2, "models": []}))

    with pytest.raises(CatalogueError, match="format_version 2.*update the DAGMaN extension"):
        load_catalogue(path)
