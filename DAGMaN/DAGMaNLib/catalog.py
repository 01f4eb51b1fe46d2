"""The model catalogue: published models from ``Resources/models.json`` plus bundle folders the user added.

Every model is identified by the sha256 of its weights file (``model.safetensors``). Bundles live
in a cache folder that the user can change, one sub-folder per model id. The weights' checksum is
verified before every use, so a bundle that was damaged or swapped on disk is not run.

Catalogue entries record where a model comes from (``url``) and what it needs. The bundle itself is
installed with ``add_folder`` (the module's "Add model from folder..." button). A folder whose
weights match a catalogue entry becomes that entry. Any other bundle becomes a user model, kept in
the settings (``QSettings`` in Slicer, any object with ``value`` and ``setValue`` elsewhere).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol

logger = logging.getLogger(__name__)

CATALOGUE_PATH = Path(__file__).resolve().parent.parent / "Resources" / "models.json"
CATALOGUE_FORMAT = 1
MODEL_JSON = "model.json"
TASKS = ("segmentation", "classification")
USER_MODELS_KEY = "DAGMaN/UserModels"
CACHE_FOLDER_KEY = "DAGMaN/ModelCacheFolder"
SELECTED_MODEL_KEY = "DAGMaN/SelectedModel"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class CatalogueError(ValueError):
    """A catalogue, bundle folder or model id that cannot be used; the message names the fix."""


class ChecksumMismatch(CatalogueError):
    """A bundle's weights differ from the checksum the catalogue or the user's settings recorded."""


class Settings(Protocol):
    """The two methods of ``QSettings`` that the catalogue uses."""

    def value(self, key: str, default=None): ...

    def setValue(self, key: str, value) -> None: ...


class MemorySettings:
    """Settings kept in a dict, for use outside Slicer (command line, tests)."""

    def __init__(self, values: Optional[dict] = None):
        self.values = dict(values or {})

    def value(self, key: str, default=None):
        return self.values.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.values[key] = value


@dataclass(frozen=True)
class CatalogueLabel:
    """One output class: its label value, name and DICOM terminology (category, type, region)."""

    value: int
    name: str
    terminology: Optional[dict] = None


@dataclass(frozen=True)
class ModelEntry:
    """One model the module can run.

    ``source`` is "catalogue" or "user"; ``folder`` is the bundle in the cache folder, ``None``
    while a catalogue model is not installed. ``min_memory_gib`` is the memory the publisher
    measured for a typical chest CT, ``None`` when unknown.
    """

    id: str
    title: str
    task: str
    sha256: str
    labels: tuple = ()
    licence: str = ""
    version: str = ""
    min_memory_gib: Optional[float] = None
    url: str = ""
    source: str = "catalogue"
    folder: Optional[Path] = field(default=None, compare=False)

    @property
    def installed(self) -> bool:
        return self.folder is not None

    def describe(self) -> str:
        """Return the model's task, classes, licence, version and memory need as one line for the panel."""
        parts = [f"{self.task.capitalize()}: {', '.join(label.name for label in self.labels) or 'no labels listed'}"]
        if self.licence:
            parts.append(f"licence {self.licence}")
        if self.version:
            parts.append(f"version {self.version}")
        if self.min_memory_gib is not None:
            parts.append(f"needs about {self.min_memory_gib:g} GiB")
        if not self.installed and self.url:
            parts.append(f"get it from {self.url}")
        elif not self.installed:
            parts.append("bundle missing from the cache folder; add it again")
        return "; ".join(parts)

    def display_name(self) -> str:
        """Return the model selector's text: title, task and whether the bundle still has to be added."""
        suffix = "" if self.installed else " (not installed)"
        return f"{self.title} [{self.task}]{suffix}"


def sha256_of_file(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks (no torch needed, unlike dagman_core)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_catalogue(path: Path = CATALOGUE_PATH) -> list[ModelEntry]:
    """Read and check a ``models.json`` catalogue; raise ``CatalogueError`` naming the bad entry."""
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CatalogueError(f"Cannot read the model catalogue {path}: {error}") from error
    if document.get("format_version") != CATALOGUE_FORMAT:
        raise CatalogueError(
            f"Model catalogue {path} has format_version {document.get('format_version')!r}; "
            f"this module reads format {CATALOGUE_FORMAT}, so update the DAGMaN extension"
        )

    entries = []
    for index, item in enumerate(document.get("models", [])):
        entry = _entry_from_dict(item, source="catalogue", where=f"{path}, model {index}")
        if any(existing.id == entry.id for existing in entries):
            raise CatalogueError(f"{path}: model id {entry.id!r} appears twice; ids must be unique")
        entries.append(entry)
    return entries


def read_bundle_description(folder: Path) -> dict:
    """Return a bundle's parsed ``model.json`` after checking the fields the catalogue needs."""
    folder = Path(folder)
    model_json = folder / MODEL_JSON
    if not model_json.is_file():
        raise CatalogueError(
            f"{folder} is not a DAGMaN model bundle: it has no {MODEL_JSON}; choose the folder that "
            "`dagman export` or `dagman demo` wrote"
        )
    try:
        description = json.loads(model_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise CatalogueError(f"Cannot read {model_json}: {error}") from error

    weights = description.get("weights") or {}
    if not weights.get("file") or not (folder / weights["file"]).is_file():
        raise CatalogueError(f"{model_json} names weights file {weights.get('file')!r}, which is not in {folder}")
    if description.get("task", "segmentation") not in TASKS:
        raise CatalogueError(f"{model_json} has task {description.get('task')!r}; valid tasks: {', '.join(TASKS)}")
    return description


class ModelCatalog:
    """Published and user-added models, their cache folder and checksum verification."""

    def __init__(self, settings: Settings, default_cache_folder: Path, catalogue_path: Path = CATALOGUE_PATH):
        """Create the catalogue view.

        :param settings: where the user's models and the cache folder are kept between sessions.
        :param default_cache_folder: the cache folder until the user chooses another one.
        :param catalogue_path: the published catalogue (``Resources/models.json``).
        """
        self.settings = settings
        self.default_cache_folder = Path(default_cache_folder)
        self.catalogue = load_catalogue(catalogue_path)

    @property
    def cache_folder(self) -> Path:
        return Path(self.settings.value(CACHE_FOLDER_KEY, "") or self.default_cache_folder)

    def set_cache_folder(self, folder) -> None:
        """Keep bundles in ``folder`` from now on; bundles already in the old folder are not moved."""
        folder = Path(folder).expanduser()
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CatalogueError(f"Cannot use {folder} as the model cache folder: {error}") from error
        if not os.access(folder, os.W_OK):
            raise CatalogueError(f"Model cache folder {folder} is not writable; choose a folder you can write to")
        self.settings.setValue(CACHE_FOLDER_KEY, str(folder))

    def entries(self) -> list[ModelEntry]:
        """Return the catalogue's models, then the user's, installed or not, in a stable order.

        A user model whose bundle is gone from the cache folder (deleted, or the folder changed)
        stays listed as not installed until the user removes it or adds it again.
        """
        published = [_with_folder(entry, self._installed_folder(entry)) for entry in self.catalogue]
        users = [_with_folder(entry, self._installed_folder(entry)) for entry in self._user_entries()]
        return published + users

    def entry(self, model_id: str) -> ModelEntry:
        for entry in self.entries():
            if entry.id == model_id:
                return entry
        known = ", ".join(entry.id for entry in self.entries()) or "none"
        raise CatalogueError(f"Unknown model {model_id!r}; known models: {known}")

    def add_folder(self, folder, progress=None) -> ModelEntry:
        """Copy the bundle in ``folder`` into the cache folder and return its entry.

        The weights' sha256 must match the one ``model.json`` records. A bundle matching a
        catalogue entry is installed as that entry; any other is added as a user model. The
        copy is written under a temporary name and renamed when complete, so an interrupted
        copy leaves nothing half-written in the cache.
        """
        source = Path(folder).expanduser().resolve()
        description = read_bundle_description(source)
        weights_path = source / description["weights"]["file"]
        if progress is not None:
            progress(f"Computing the checksum of {weights_path.name}")
        actual = sha256_of_file(weights_path)
        recorded = description["weights"].get("sha256")
        if recorded and recorded != actual:
            raise ChecksumMismatch(
                f"The weights in {source} have sha256 {actual}, but its {MODEL_JSON} records {recorded}; "
                "the bundle is damaged or was edited, so export it again"
            )

        published = next((entry for entry in self.catalogue if entry.sha256 == actual), None)
        if published is not None:
            entry = published
        else:
            entry = _entry_from_description(description, actual)

        target = self.cache_folder / entry.id
        if target.resolve() != source:
            if progress is not None:
                progress(f"Copying the model into {self.cache_folder}")
            _copy_atomically(source, target)
        if published is None:
            self._save_user_entries([item for item in self._user_entries() if item.id != entry.id] + [entry])
        logger.info("Added model %s (%s) from %s", entry.id, entry.title, source)
        return _with_folder(entry, target)

    def remove(self, model_id: str) -> None:
        """Delete a model's bundle from the cache folder and forget a user model."""
        entry = self.entry(model_id)
        if entry.folder is not None:
            shutil.rmtree(entry.folder, ignore_errors=True)
        self._save_user_entries([item for item in self._user_entries() if item.id != model_id])

    def verified_folder(self, model_id: str) -> Path:
        """Return the bundle folder of ``model_id`` after checking its weights against the recorded sha256."""
        entry = self.entry(model_id)
        if entry.folder is None and entry.source == "user":
            raise CatalogueError(
                f"The bundle of model {entry.title!r} is no longer in {self.cache_folder}; add it again with "
                "\"Add model from folder...\" or remove it from the list"
            )
        if entry.folder is None:
            where = f" from {entry.url}" if entry.url else ""
            raise CatalogueError(
                f"Model {entry.title!r} is not installed; get its bundle{where}, then use "
                "\"Add model from folder...\""
            )
        description = read_bundle_description(entry.folder)
        actual = sha256_of_file(entry.folder / description["weights"]["file"])
        if actual != entry.sha256:
            raise ChecksumMismatch(
                f"The weights of {entry.title!r} in {entry.folder} have sha256 {actual}, but {entry.sha256} was "
                "recorded; the file is damaged or was replaced. Remove the model and add it again"
            )
        return entry.folder

    def _installed_folder(self, entry: ModelEntry) -> Optional[Path]:
        folder = self.cache_folder / entry.id
        return folder if (folder / MODEL_JSON).is_file() else None

    def _user_entries(self) -> list[ModelEntry]:
        stored = self.settings.value(USER_MODELS_KEY, "") or "[]"
        try:
            items = json.loads(stored)
        except (TypeError, json.JSONDecodeError):
            logger.warning("Ignoring unreadable user model list in the settings: %r", stored)
            return []
        entries = []
        for item in items:
            try:
                entries.append(_entry_from_dict(item, source="user", where="user model settings"))
            except CatalogueError as error:
                logger.warning("Ignoring a user model: %s", error)
        return entries

    def _save_user_entries(self, entries: list[ModelEntry]) -> None:
        items = []
        for entry in entries:
            item = asdict(entry)
            item.pop("folder")
            item.pop("source")
            item["labels"] = [asdict(label) for label in entry.labels]
            items.append(item)
        self.settings.setValue(USER_MODELS_KEY, json.dumps(items))


def _entry_from_dict(item: dict, source: str, where: str) -> ModelEntry:
    missing = [key for key in ("id", "title", "task", "sha256") if not item.get(key)]
    if missing:
        raise CatalogueError(f"{where}: missing {', '.join(missing)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", item["id"]):
        raise CatalogueError(f"{where}: invalid id {item['id']!r}; use only letters, digits, '.', '_' and '-'")
    if item["task"] not in TASKS:
        raise CatalogueError(f"{where}: task {item['task']!r} is invalid; valid tasks: {', '.join(TASKS)}")
    if not SHA256_PATTERN.match(item["sha256"]):
        raise CatalogueError(f"{where}: invalid sha256 {item['sha256']!r}; expected 64 lowercase hex digits")
    labels = tuple(
        CatalogueLabel(int(label["value"]), str(label["name"]), label.get("terminology"))
        for label in item.get("labels", [])
    )
    min_memory = item.get("min_memory_gib")
    return ModelEntry(
        id=item["id"],
        title=item["title"],
        task=item["task"],
        sha256=item["sha256"],
        labels=labels,
        licence=item.get("licence", ""),
        version=str(item.get("version", "")),
        min_memory_gib=float(min_memory) if min_memory is not None else None,
        url=item.get("url", ""),
        source=source,
    )


def _entry_from_description(description: dict, sha256: str) -> ModelEntry:
    """Return the user entry of a bundle: id from its name and the first 8 hex digits of its checksum."""
    name = str(description.get("name") or "model")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "model"
    provenance = description.get("provenance", {})
    labels = tuple(
        CatalogueLabel(int(label["value"]), str(label["name"]), label.get("terminology"))
        for label in description.get("labels", [])
    )
    return ModelEntry(
        id=f"{slug}-{sha256[:8]}",
        title=name,
        task=description.get("task", "segmentation"),
        sha256=sha256,
        labels=labels,
        licence=str(description.get("licence", "")),
        version=str(provenance.get("dagman_version", "")),
        source="user",
    )


def _with_folder(entry: ModelEntry, folder: Optional[Path]) -> ModelEntry:
    return ModelEntry(**{**{key: getattr(entry, key) for key in entry.__dataclass_fields__}, "folder": folder})


def _copy_atomically(source: Path, target: Path) -> None:
    """Copy folder ``source`` to ``target`` through a temporary sibling, replacing an earlier ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for item in source.iterdir():
            if item.is_file():
                shutil.copy2(item, staging / item.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
