"""MONAI-style datalists: JSON files listing image (and label) paths per split."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .io import is_image_file


def load_datalist(path: str | os.PathLike, key: str = "training", require_labels: bool = False) -> list[dict]:
    """Read the ``key`` list of a datalist JSON and return its entries with absolute paths.

    Relative ``image`` and ``label`` paths are taken relative to the JSON file's folder.

    Raises:
        FileNotFoundError: the datalist or a file it names does not exist.
        ValueError: the list is missing or empty, or a label is required and missing.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"datalist not found: {path}")
    with open(path, encoding="utf-8") as stream:
        content = json.load(stream)
    entries = content.get(key) if isinstance(content, dict) else None
    if not entries:
        raise ValueError(f"datalist {path} has no entries under {key!r}; expected {{\"{key}\": [{{\"image\": ...}}, ...]}}")

    resolved = []
    for number, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"image": entry}
        if "image" not in entry:
            raise ValueError(f"entry {number} of {key!r} in {path} has no 'image' path")
        if require_labels and "label" not in entry:
            raise ValueError(f"entry {number} of {key!r} in {path} has no 'label' path, which segmentation needs")
        item = dict(entry)
        for field in ("image", "label"):
            if field in item:
                file_path = Path(item[field])
                if not file_path.is_absolute():
                    file_path = path.parent / file_path
                if not file_path.exists():
                    raise FileNotFoundError(f"{field} of entry {number} in {path} not found: {file_path}")
                item[field] = str(file_path)
        resolved.append(item)
    return resolved


def label_names(path: str | os.PathLike) -> dict[int, str]:
    """Return the datalist's ``labels`` mapping (value to name), or ``{}`` when it has none."""
    with open(path, encoding="utf-8") as stream:
        content = json.load(stream)
    return {int(value): str(name) for value, name in (content.get("labels") or {}).items()}


LABEL_TAILS = ("_label", "_labels", "_seg", "_mask")
IMAGE_TAILS = ("_image", "_ct", "_0000")


def _strip_suffix(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_label_name(path: Path) -> bool:
    return _strip_suffix(path).lower().endswith(LABEL_TAILS)


def _case_id(path: Path) -> str:
    name = _strip_suffix(path)
    for tail in LABEL_TAILS + IMAGE_TAILS:
        if name.lower().endswith(tail):
            return name[: -len(tail)]
    return name


def build_datalist(images_dir: str | os.PathLike, labels_dir: str | os.PathLike | None, output: str | os.PathLike) -> dict:
    """Write a datalist JSON pairing each volume in ``images_dir`` with its label in ``labels_dir``.

    Images and labels are paired by case id: the file name without its suffix and without a trailing
    ``_image``, ``_ct``, ``_0000``, ``_label``, ``_labels``, ``_seg`` or ``_mask``. Files whose name
    ends in one of the label tails are never taken as images, so both may share one folder.
    Subfolders holding DICOM series count as images. Paths are written relative to the output file's
    folder.
    """
    images_dir, output = Path(images_dir), Path(output)
    if not images_dir.is_dir():
        raise FileNotFoundError(f"images folder not found: {images_dir}")

    images = sorted(
        entry
        for entry in images_dir.iterdir()
        if (entry.is_file() and is_image_file(entry) and not _is_label_name(entry)) or (entry.is_dir() and any(entry.glob("*.dcm")))
    )
    if labels_dir is not None:
        labels_dir = Path(labels_dir)
        if not labels_dir.is_dir():
            raise FileNotFoundError(f"labels folder not found: {labels_dir}")
        candidates = [entry for entry in sorted(labels_dir.iterdir()) if entry.is_file() and is_image_file(entry)]
        if labels_dir.resolve() == images_dir.resolve():
            candidates = [entry for entry in candidates if _is_label_name(entry)]
        labels = {_case_id(entry): entry for entry in candidates}
    if not images:
        raise ValueError(f"no CT volumes (NIfTI, NRRD, MHA or DICOM series folders) found in {images_dir}")

    output.parent.mkdir(parents=True, exist_ok=True)
    training = []
    for image in images:
        entry = {"image": os.path.relpath(image.resolve(), output.parent.resolve())}
        if labels_dir is not None:
            label = labels.get(_case_id(image))
            if label is None:
                raise FileNotFoundError(f"no label for image {image.name} in {labels_dir} (looked for case id {_case_id(image)!r})")
            entry["label"] = os.path.relpath(label.resolve(), output.parent.resolve())
        training.append(entry)

    datalist = {"training": training}
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_text(json.dumps(datalist, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, output)
    return datalist
