"""Cohort cases: which CT volume goes with which segmentation, case names and the validation split."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

TRAINING = "training"
VALIDATION = "validation"
SPLITS = (TRAINING, VALIDATION)
REFERENCE_GEOMETRY_ROLE = "referenceImageGeometryRef"


@dataclass(frozen=True)
class CohortCase:
    """One exported case: a CT scalar volume node, its segmentation node, a file-safe name and its split."""

    name: str
    volume_node: object
    segmentation_node: object
    split: str = TRAINING


def safe_case_name(name: str) -> str:
    """Return ``name`` with every run of characters other than letters, digits, '.', '_', '-' replaced by '_'."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "case"


def find_segmentation_for_volume(volume_node):
    """Return the segmentation node whose reference image geometry is ``volume_node``, or ``None``.

    Raises ``ValueError`` when several segmentation nodes reference the volume, because the
    choice would be a guess.
    """
    scene = volume_node.GetScene()
    matches = []
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        segmentation_node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        if segmentation_node.GetNodeReferenceID(REFERENCE_GEOMETRY_ROLE) == volume_node.GetID():
            matches.append(segmentation_node)
    if len(matches) > 1:
        names = [node.GetName() for node in matches]
        raise ValueError(
            f"Volume {volume_node.GetName()!r} is the reference of several segmentations {names}; "
            "delete the extra ones or pair them explicitly"
        )
    return matches[0] if matches else None


def build_cases(volume_nodes: Iterable, segmentation_nodes: Sequence | None = None) -> list[CohortCase]:
    """Pair each volume with its segmentation and give each case a unique file-safe name.

    ``segmentation_nodes`` pairs by position. When it is ``None``, each volume's segmentation
    is found by ``find_segmentation_for_volume``. Raises ``ValueError`` naming every volume
    that has no segmentation.
    """
    volume_nodes = list(volume_nodes)
    if not volume_nodes:
        raise ValueError("No volumes selected; choose at least one CT volume with a segmentation")
    if segmentation_nodes is not None and len(segmentation_nodes) != len(volume_nodes):
        raise ValueError(
            f"{len(volume_nodes)} volumes but {len(segmentation_nodes)} segmentations were given; pass one per volume"
        )

    pairs = []
    missing = []
    for index, volume_node in enumerate(volume_nodes):
        if segmentation_nodes is not None:
            segmentation_node = segmentation_nodes[index]
        else:
            segmentation_node = find_segmentation_for_volume(volume_node)
        if segmentation_node is None:
            missing.append(volume_node.GetName())
        pairs.append((volume_node, segmentation_node))
    if missing:
        raise ValueError(
            f"No segmentation found for volumes {missing}; create one in Segment Editor with the volume as "
            "source geometry"
        )

    cases = []
    used_names: set[str] = set()
    for volume_node, segmentation_node in pairs:
        base = safe_case_name(volume_node.GetName())
        name = base
        suffix = 2
        while name.lower() in used_names:
            name = f"{base}_{suffix}"
            suffix += 1
        used_names.add(name.lower())
        cases.append(CohortCase(name=name, volume_node=volume_node, segmentation_node=segmentation_node))
    return cases


def assign_validation_split(cases: Sequence[CohortCase], validation_fraction: float) -> list[CohortCase]:
    """Return ``cases`` with the last ``round(fraction * n)`` marked as validation (at least one stays training).

    A fraction above 0 gives at least one validation case when there are two or more cases.
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction {validation_fraction} must lie in [0, 1)")
    count = len(cases)
    validation_count = round(validation_fraction * count)
    if validation_fraction > 0.0 and count >= 2:
        validation_count = max(validation_count, 1)
    validation_count = min(validation_count, count - 1) if count else 0

    first_validation = count - validation_count
    return [
        dataclasses.replace(case, split=VALIDATION if index >= first_validation else TRAINING)
        for index, case in enumerate(cases)
    ]
