"""DAGMaNLogic: runs DAGMaN inference on a CT volume node in a child process and loads the results."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from .catalog import read_bundle_description
from .command import build_child_environment, build_inference_command, find_python_executable, validate_device
from .display import (
    DEFAULT_FOREGROUND_OPACITY,
    DEFAULT_LOWER_THRESHOLD,
    set_foreground_opacity,
    set_foreground_visible,
    set_lower_threshold,
)
from .errors import InferenceCancelled, InferenceError
from .environment import TorchProbe
from .job import CHILD_PROGRESS_SHARE, InferenceJob, JobState, ProgressCallback
from .memory import available_memory, estimate_peak_memory, memory_warning
from .outputs import InferenceOutputs, load_outputs, remove_previous_results
from .results import read_result
from .runner import ProcessRunner, SubprocessRunner
from .volume_io import write_volume_node

logger = logging.getLogger(__name__)

INPUT_FILE_NAME = "input.nrrd"
MASK_FILE_NAME = "lesion_mask.nrrd"
# How long abandon() waits for a killed child to be reaped before it deletes the temporary folder.
ABANDON_WAIT_S = 5.0
OUTPUT_DIR_NAME = "output"


class DAGMaNLogic:
    """Qt-free logic of the DAGMaN module.

    ``run()`` blocks until the results are in the scene. The widget instead calls
    ``start()``, then ``job.poll()`` from a timer until it returns ``True``, then
    ``finish(job)``; ``cancel()`` kills the child process tree at any time.

    The child process is ``python -m dagman_core.inference`` (see ``command.py``); torch is
    imported only there, never in Slicer's own process.
    """

    def __init__(
        self,
        runner: Optional[ProcessRunner] = None,
        python_executable: Optional[str] = None,
        attention_threshold: float = DEFAULT_LOWER_THRESHOLD,
        attention_opacity: float = DEFAULT_FOREGROUND_OPACITY,
        keep_temporary_files: bool = False,
        keep_previous_results: bool = False,
    ):
        """Create the logic.

        :param runner: starts the child process; ``SubprocessRunner()`` when ``None``.
        :param python_executable: interpreter for the child; found by ``find_python_executable`` when ``None``.
        :param attention_threshold: attention values below it are transparent in slice views (0..1).
        :param attention_opacity: foreground opacity of the attention map over the CT (0..1).
        :param keep_temporary_files: keep the input/output folder after the run, for debugging.
        :param keep_previous_results: keep the result nodes of earlier runs of the same model on the same
            volume; by default a successful run replaces them.
        """
        self.runner = runner if runner is not None else SubprocessRunner()
        self.python_executable = python_executable
        self.attention_threshold = attention_threshold
        self.attention_opacity = attention_opacity
        self.keep_temporary_files = keep_temporary_files
        self.keep_previous_results = keep_previous_results
        self.job: Optional[InferenceJob] = None

    def run(
        self,
        volume_node,
        model_dir,
        device: str = "auto",
        progress_callback: Optional[ProgressCallback] = None,
        timeout_s: Optional[float] = None,
        poll_interval_s: float = 0.05,
        point_node=None,
        mask_node=None,
    ) -> InferenceOutputs:
        """Run inference and load its results, blocking until done.

        Raises ``InferenceError`` with the child's message on failure, ``InferenceCancelled``
        if ``cancel()`` was called (for example from ``progress_callback``), and ``ValueError``
        for an invalid input volume, model folder or device.
        """
        job = self.start(volume_node, model_dir, device, progress_callback, timeout_s, point_node, mask_node)
        try:
            while not job.poll():
                time.sleep(poll_interval_s)
        except BaseException:
            # An exception from progress_callback, or KeyboardInterrupt: stop the child too.
            job.cancel()
            self._discard(job)
            raise
        return self.finish(job)

    def start(
        self,
        volume_node,
        model_dir,
        device: str = "auto",
        progress_callback: Optional[ProgressCallback] = None,
        timeout_s: Optional[float] = None,
        point_node=None,
        mask_node=None,
    ) -> InferenceJob:
        """Write the volume to a temporary .nrrd file and start the inference child process.

        :param volume_node: ``vtkMRMLScalarVolumeNode`` in a scene (CT in HU, any geometry).
        :param model_dir: folder of a DAGMaN model bundle.
        :param device: "auto", "cpu", "cuda" or "cuda:N".
        :param progress_callback: called as ``callback(fraction, message)`` with fraction in [0, 1].
        :param timeout_s: kill the child and fail after this many seconds; ``None`` waits forever.
        :param point_node: markups node whose first control point (world RAS, mm) centres the crop of
            a classification model on a lesion; ``None`` centres it on the body.
        :param mask_node: segmentation or label map volume of the lesion, whose centre of mass centres
            a classification model's crop; give a point or a mask, not both.
        """
        if self.job is not None and not self.job.finished:
            raise RuntimeError("An inference is already running; cancel it or wait for it to finish")
        if self.job is not None:
            # A finished job whose results were never loaded.
            self._discard(self.job)
        model_path = self._validate_inputs(volume_node, model_dir, device)
        if (point_node is not None or mask_node is not None) and _model_task(model_path) != "classification":
            logger.info("The model in %s is not a classifier, so the lesion point and mask are not used", model_path)
            point_node = mask_node = None
        if point_node is not None and mask_node is not None:
            raise ValueError("Choose a lesion point or a lesion mask, not both")
        point_ras = lesion_point_ras(point_node) if point_node is not None else None

        temp_dir = Path(tempfile.mkdtemp(prefix="DAGMaN-"))
        output_dir = temp_dir / OUTPUT_DIR_NAME
        try:
            output_dir.mkdir()
            if progress_callback is not None:
                progress_callback(0.0, f"Writing {volume_node.GetName()} for the inference process")
            input_path = temp_dir / INPUT_FILE_NAME
            write_volume_node(volume_node, input_path)
            mask_path = None
            if mask_node is not None:
                mask_path = temp_dir / MASK_FILE_NAME
                write_lesion_mask(mask_node, volume_node, mask_path)

            python_executable = self.python_executable or find_python_executable()
            command = build_inference_command(
                python_executable, model_path, input_path, output_dir, device, point_ras, mask_path
            )
            try:
                child = self.runner.start(command, build_child_environment())
            except OSError as error:
                raise InferenceError(f"Could not start the inference process {command[0]!r}: {error}") from error
        except Exception:
            self._remove_temp_dir(temp_dir)
            raise

        self.job = InferenceJob(
            child, volume_node, model_path, device, temp_dir, output_dir, progress_callback, timeout_s
        )
        return self.job

    def finish(self, job: InferenceJob) -> InferenceOutputs:
        """Load the results of a finished job into the scene and delete its temporary folder.

        Raises ``InferenceCancelled`` or ``InferenceError`` for a job that did not succeed;
        the scene then gets no result nodes.
        """
        if not job.finished:
            raise RuntimeError("The inference job is still running; call job.poll() until it returns True")
        try:
            if job.state is JobState.CANCELLED:
                raise InferenceCancelled("The inference was cancelled")
            if job.state is JobState.FAILED:
                raise InferenceError(
                    f"DAGMaN inference failed: {job.failure_message()}",
                    returncode=job.returncode,
                    child_message=job.child_error_message(),
                )

            if job.volume_node.GetScene() is None:
                raise InferenceError(
                    f"The input volume {job.volume_node.GetName()!r} was removed from the scene during the "
                    "inference, so its results were discarded"
                )

            job.report(CHILD_PROGRESS_SHARE, "Loading the results and the attention map")
            result = read_result(job.output_dir)
            try:
                outputs = load_outputs(job.volume_node, result, self.attention_threshold, self.attention_opacity)
            except (OSError, ValueError, MemoryError) as error:
                # load_outputs has removed the nodes it added, so the scene is as before the run.
                raise InferenceError(f"Loading the results of the inference failed: {error}") from error
            if not self.keep_previous_results:
                new_nodes = (outputs.segmentation_node, outputs.attention_node, outputs.table_node)
                remove_previous_results(job.volume_node, result.model_sha256, keep=new_nodes)
            job.report(1.0, "Done")
            return outputs
        finally:
            self._discard(job)

    def abandon(self) -> None:
        """Kill the running child process tree, if any, and delete its temporary folder.

        For a widget that closes during a run: no results are loaded and ``finish`` is not needed.
        """
        job = self.job
        if job is None:
            return
        job.cancel()
        deadline = time.monotonic() + ABANDON_WAIT_S
        while not job.poll() and time.monotonic() < deadline:
            time.sleep(0.05)
        self._discard(job)

    def cancel(self) -> None:
        """Kill the running child process tree, if any; ``finish`` then raises ``InferenceCancelled``."""
        if self.job is not None:
            self.job.cancel()

    def set_attention_opacity(self, opacity: float, attention_node=None) -> None:
        """Set the foreground opacity (0..1) of the slice views showing ``attention_node`` (any, if ``None``)."""
        self.attention_opacity = opacity
        scene = attention_node.GetScene() if attention_node is not None else _default_scene()
        if scene is not None:
            set_foreground_opacity(scene, opacity, attention_node)

    def memory_report(
        self, volume_node, model_dir, device: str = "auto", probe: Optional[TorchProbe] = None
    ) -> tuple[str, str]:
        """Estimate the peak memory of running the bundle in ``model_dir`` on ``volume_node``.

        Returns ``(summary, warning)``: a line such as "Peak memory about 1.2 GiB on cpu; 14 GiB
        available" and a warning that is empty when the run fits. "auto" means the first CUDA device
        that ``probe`` (the child process's view of torch) lists, else the CPU; the free GPU memory
        also comes from ``probe``. A bundle whose model.json cannot be read gives a warning and no
        estimate, since the run itself will report that error.
        """
        device = validate_device(device)
        cuda_devices = {f"cuda:{cuda.index}": cuda for cuda in (probe.devices if probe is not None else ())}
        if device == "auto":
            device = "cuda:0" if "cuda:0" in cuda_devices else "cpu"
        elif device == "cuda":
            device = "cuda:0"

        model_path = Path(model_dir)
        try:
            description = read_bundle_description(model_path)
            weights = model_path / description["weights"]["file"]
            image = volume_node.GetImageData()
            estimate = estimate_peak_memory(
                description,
                image.GetDimensions(),
                volume_node.GetSpacing(),
                device,
                input_bytes_per_voxel=image.GetScalarSize(),
                weights_bytes=weights.stat().st_size,
            )
        except (OSError, KeyError, TypeError, ValueError, AttributeError) as error:
            return "", f"No memory estimate: {error}"

        free_gpu = cuda_devices[device].free_bytes if device in cuda_devices else None
        available = available_memory(device, free_gpu)
        host_available = available_memory("cpu") if device != "cpu" else None
        return f"Peak memory {estimate.describe(available)}", memory_warning(estimate, available, host_available)

    def set_attention_threshold(self, lower_threshold: float, attention_node) -> None:
        """Make attention below ``lower_threshold`` (0..1) transparent; later runs use the same threshold."""
        set_lower_threshold(attention_node, lower_threshold)
        self.attention_threshold = lower_threshold

    def set_attention_visible(self, visible: bool, attention_node) -> int:
        """Show or hide the attention map (and its color legend) over the CT in the slice views."""
        return set_foreground_visible(attention_node.GetScene(), attention_node, visible, self.attention_opacity)

    def _validate_inputs(self, volume_node, model_dir, device: str) -> Path:
        if volume_node is None:
            raise ValueError("No input volume selected; choose a CT scalar volume")
        if not volume_node.IsA("vtkMRMLScalarVolumeNode") or volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
            raise ValueError(
                f"Input {volume_node.GetName()!r} is a {volume_node.GetClassName()}; choose a CT scalar volume"
            )
        if volume_node.GetScene() is None:
            raise ValueError(f"Input volume {volume_node.GetName()!r} is not in a scene")
        image = volume_node.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise ValueError(f"Input volume {volume_node.GetName()!r} has no voxels; load the CT first")
        if image.GetNumberOfScalarComponents() != 1:
            raise ValueError(
                f"Input volume {volume_node.GetName()!r} has {image.GetNumberOfScalarComponents()} components per "
                "voxel; DAGMaN needs a single-component CT"
            )

        if model_dir is None or str(model_dir).strip() == "":
            raise ValueError("No model folder selected; choose the folder of a DAGMaN model bundle")
        model_path = Path(model_dir).expanduser()
        if not model_path.is_dir():
            raise ValueError(f"Model folder {str(model_path)!r} does not exist or is not a folder")

        validate_device(device)
        return model_path.resolve()

    def _discard(self, job: InferenceJob) -> None:
        self._remove_temp_dir(job.temp_dir)
        if self.job is job:
            self.job = None

    def _remove_temp_dir(self, temp_dir: Path) -> None:
        if self.keep_temporary_files:
            logger.info("Keeping temporary inference folder %s", temp_dir)
            return
        shutil.rmtree(temp_dir, ignore_errors=True)


def _model_task(model_path: Path) -> str:
    """Return the task of the bundle in ``model_path``, "segmentation" when model.json has no task."""
    try:
        return json.loads((model_path / "model.json").read_text(encoding="utf-8")).get("task", "segmentation")
    except (OSError, ValueError, AttributeError):
        # An unreadable bundle fails in the child, with the child's own message.
        return "unknown"


def lesion_point_ras(markups_node) -> tuple[float, float, float]:
    """Return the world RAS position (mm) of the first control point of ``markups_node``."""
    if markups_node.GetNumberOfControlPoints() == 0:
        raise ValueError(
            f"Point list {markups_node.GetName()!r} has no points; place a point on the lesion or choose no point list"
        )
    position = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(0, position)
    return tuple(float(value) for value in position)


def write_lesion_mask(mask_node, volume_node, path: Path) -> None:
    """Write a lesion mask (segmentation or label map volume node) as a label map file at ``path``.

    A segmentation's visible segments are exported on the CT's voxel grid. Raises ``ValueError``
    for a mask without any voxel, since it cannot centre a crop.
    """
    import slicer

    if mask_node.IsA("vtkMRMLSegmentationNode"):
        scene = volume_node.GetScene()
        color_ids_before = {
            scene.GetNthNodeByClass(index, "vtkMRMLColorNode").GetID()
            for index in range(scene.GetNumberOfNodesByClass("vtkMRMLColorNode"))
        }
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "DAGMaN lesion mask")
        try:
            slicer.vtkSlicerSegmentationsModuleLogic.ExportVisibleSegmentsToLabelmapNode(mask_node, labelmap, volume_node)
            _write_nonempty_mask(labelmap, mask_node.GetName(), path)
        finally:
            # The export adds a display node and may add a color table for the label map; neither stays.
            display_node = labelmap.GetDisplayNode()
            color_node = display_node.GetColorNode() if display_node is not None else None
            if color_node is not None and color_node.GetID() in color_ids_before:
                color_node = None
            for node in (color_node, display_node, labelmap):
                if node is not None and node.GetScene() is scene:
                    scene.RemoveNode(node)
    elif mask_node.IsA("vtkMRMLLabelMapVolumeNode"):
        _write_nonempty_mask(mask_node, mask_node.GetName(), path)
    else:
        raise ValueError(
            f"Lesion mask {mask_node.GetName()!r} is a {mask_node.GetClassName()}; choose a segmentation or a label map"
        )


def _write_nonempty_mask(labelmap, name: str, path: Path) -> None:
    import slicer.util

    if labelmap.GetImageData() is None or not slicer.util.arrayFromVolume(labelmap).any():
        raise ValueError(f"Lesion mask {name!r} has no voxels; paint the lesion first or choose no mask")
    write_volume_node(labelmap, path)


def _default_scene():
    import slicer

    return getattr(slicer, "mrmlScene", None)
