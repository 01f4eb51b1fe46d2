"""Qt-free logic of the DAGMaNTrain Slicer module: export of a labelled cohort for fine-tuning.

It writes the files that ``dagman finetune --datalist JSON`` reads. Nothing here imports
torch.
"""

from .cohort import (
    TRAINING,
    VALIDATION,
    CohortCase,
    assign_validation_split,
    build_cases,
    find_segmentation_for_volume,
    safe_case_name,
)
from .exporter import DATALIST_FILE_NAME, CohortExport, export_cohort
from .labels import assign_label_values, segmentation_to_label_array

__all__ = [
    "DATALIST_FILE_NAME",
    "TRAINING",
    "VALIDATION",
    "CohortCase",
    "CohortExport",
    "assign_label_values",
    "assign_validation_split",
    "build_cases",
    "export_cohort",
    "find_segmentation_for_volume",
    "safe_case_name",
    "segmentation_to_label_array",
]
