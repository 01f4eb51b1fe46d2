"""Qt-free logic of the DAGMaN Slicer module.

Every module here runs under the Slicer application and under slicer-core alike, and none
imports torch: inference runs in a child process (``python -m dagman_core.inference``).
"""

from .errors import DAGMaNError, InferenceCancelled, InferenceError, ResultFormatError
from .job import InferenceJob, JobState
from .logic import DAGMaNLogic
from .outputs import InferenceOutputs
from .results import InferenceResult, LabelInfo
from .runner import ChildProcess, ProcessRunner, SubprocessRunner, kill_process_tree

__all__ = [
    "ChildProcess",
    "DAGMaNError",
    "DAGMaNLogic",
    "InferenceCancelled",
    "InferenceError",
    "InferenceJob",
    "InferenceOutputs",
    "InferenceResult",
    "JobState",
    "LabelInfo",
    "ProcessRunner",
    "ResultFormatError",
    "SubprocessRunner",
    "kill_process_tree",
]
