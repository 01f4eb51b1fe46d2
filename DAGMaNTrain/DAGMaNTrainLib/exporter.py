"""Export of a cohort (CT volumes with segmentations) to NRRD files and a MONAI-style datalist JSON."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import slicer
import slicer.util
import vtk

from .atomic import write_json_atomically, write_volume_node_atomically
from .cohort import SPLITS, TRAINING, VALIDATION, CohortCase
from .labels import assign_label_values, segmentation_to_label_array

logger = logging.getLogger(__name__)

CASES_DIR_NAME = "cases"
DATALIST_FILE_NAME = "datalist.json"
IMAGE_SUFFIX = "_image.nrrd"
LABEL_SUFFIX = "_label.nrrd"

ProgressCallback = Callable[[float, str], None]


@dataclass
class CohortExport:
    """Summary of one ``export_cohort`` call: the datalist path and content, label values and case files."""

    datalist_path: Path
    label_values: dict[str, int]
    datalist: dict
    case_files: list[tuple[str, Path, Path]] = field(default_factory=list)


def export_cohort(
    cases: Sequence[CohortCase],
    output_dir: Path,
    label_names: Optional[Iterable[str]] = None,
    datalist_name: str = DATALIST_FILE_NAME,
    compress: bool = True,
    progress_callback: Optional[ProgressCallback] = None,
) -> CohortExport:
    """Write each case's image and label map, then the datalist JSON, into ``output_dir``.

    Files: ``cases/<case>_image.nrrd`` (the CT as it is in the scene: voxel type, spacing in mm,
    origin and direction) and ``cases/<case>_label.nrrd`` (uint8 labels on the image's voxel
    grid), then ``<datalist_name>``::

        {"labels": {"0": "background", "1": "Lung tumor"},
         "training": [{"image": "cases/a_image.nrrd", "label": "cases/a_label.nrrd"}],
         "validation": [...]}

    with paths relative to the JSON's folder; "validation" is present only when some case has
    that split. Every file is written atomically. The datalist is written last, so it only
    exists when all its cases were written.
    """
    if not cases:
        raise ValueError("No cases to export; choose at least one CT volume with a segmentation")
    _validate_cases(cases)
    output_dir = Path(output_dir)
    cases_dir = output_dir / CASES_DIR_NAME
    cases_dir.mkdir(parents=True, exist_ok=True)

    label_values = assign_label_values([case.segmentation_node for case in cases], label_names)
    logger.info("Exporting %d cases to %s with labels %s", len(cases), output_dir, label_values)

    entries: dict[str, list[dict[str, str]]] = {TRAINING: [], VALIDATION: []}
    export = CohortExport(datalist_path=output_dir / datalist_name, label_values=label_values, datalist={})
    for number, case in enumerate(cases):
        if progress_callback is not None:
            progress_callback(number / len(cases), f"Exporting {case.name}")
        image_path = cases_dir / f"{case.name}{IMAGE_SUFFIX}"
        label_path = cases_dir / f"{case.name}{LABEL_SUFFIX}"
        _export_case(case, image_path, label_path, label_values, compress)

        entries[case.split].append(
            {"image": image_path.relative_to(output_dir).as_posix(), "label": label_path.relative_to(output_dir).as_posix()}
        )
        export.case_files.append((case.name, image_path, label_path))

    datalist = {"labels": {"0": "background", **{str(value): name for name, value in label_values.items()}}}
    datalist[TRAINING] = entries[TRAINING]
    if entries[VALIDATION]:
        datalist[VALIDATION] = entries[VALIDATION]
    write_json_atomically(datalist, export.datalist_path)
    export.datalist = datalist

    if progress_callback is not None:
        progress_callback(1.0, f"Wrote {export.datalist_path}")
    logger.info("Wrote datalist %s", export.datalist_path)
    return export


def _validate_cases(cases: Sequence[CohortCase]) -> None:
    names = [case.name.lower() for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Case names {duplicates} are used more than once; case names must be unique")
    for case in cases:
        volume_node = case.volume_node
        if case.split not in SPLITS:
            raise ValueError(f"Case {case.name!r} has split {case.split!r}; valid choices: {list(SPLITS)}")
        if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(f"Case {case.name!r}: {volume_node.GetName()!r} is not a scalar CT volume")
        if volume_node.GetImageData() is None:
            raise ValueError(f"Case {case.name!r}: volume {volume_node.GetName()!r} has no voxels")
        if volume_node.GetParentTransformNode() is not None:
            raise ValueError(
                f"Case {case.name!r}: volume {volume_node.GetName()!r} is under transform "
                f"{volume_node.GetParentTransformNode().GetName()!r}, which NRRD files cannot keep; "
                "harden the transform first"
            )
        if case.segmentation_node is None or not case.segmentation_node.IsA("vtkMRMLSegmentationNode"):
            raise ValueError(f"Case {case.name!r} has no segmentation node")


def _export_case(case: CohortCase, image_path: Path, label_path: Path, label_values: dict[str, int], compress: bool) -> None:
    volume_node = case.volume_node
    scene = volume_node.GetScene()
    labels = segmentation_to_label_array(case.segmentation_node, volume_node, label_values)

    write_volume_node_atomically(volume_node, image_path, compress)

    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName(f"{case.name} label"))
    try:
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(ijk_to_ras)
        labelmap_node.SetIJKToRASMatrix(ijk_to_ras)
        slicer.util.updateVolumeFromArray(labelmap_node, labels)
        write_volume_node_atomically(labelmap_node, label_path, compress)
    finally:
        scene.RemoveNode(labelmap_node)
    logger.info("Exported case %s: %s, %s", case.name, image_path.name, label_path.name)
