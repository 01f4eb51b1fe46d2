"""One running inference child process: progress parsing, cancel, timeout and its final state."""

from __future__ import annotations

import collections
import enum
import logging
import time
from pathlib import Path
from typing import Callable, Optional

from .progress import ProgressEvent, parse_progress_line
from .runner import ChildProcess

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[float, str], None]
# Number of plain stdout lines and of stderr lines kept for error messages. Older lines are only logged.
OUTPUT_LINES_KEPT = 200

# Share of the progress bar for the child process. Loading the results takes the rest.
CHILD_PROGRESS_SHARE = 0.95


class JobState(enum.Enum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class InferenceJob:
    """Tracks one child process started by ``DAGMaNLogic.start``.

    Call ``poll()`` repeatedly from the thread that owns the scene, such as a timer in the
    widget or the loop in ``DAGMaNLogic.run``. It hands new progress lines to
    ``progress_callback`` as ``(fraction, message)`` and returns ``True`` once the job
    reached its final state.
    """

    def __init__(
        self,
        child: ChildProcess,
        volume_node,
        model_dir: Path,
        device: str,
        temp_dir: Path,
        output_dir: Path,
        progress_callback: Optional[ProgressCallback] = None,
        timeout_s: Optional[float] = None,
    ):
        self.child = child
        self.volume_node = volume_node
        self.model_dir = model_dir
        self.device = device
        self.temp_dir = temp_dir
        self.output_dir = output_dir
        self.progress_callback = progress_callback
        self.timeout_s = timeout_s

        self.state = JobState.RUNNING
        self.returncode: Optional[int] = None
        self.last_event: Optional[ProgressEvent] = None
        self.error_event: Optional[ProgressEvent] = None
        self.output_lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self.stderr_lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self.started_at = time.monotonic()
        self._cancel_requested = False
        self._timed_out = False

    @property
    def finished(self) -> bool:
        return self.state is not JobState.RUNNING

    def poll(self) -> bool:
        """Process new output and return ``True`` when the child has exited (or was killed)."""
        if self.finished:
            return True

        self._drain_output()
        returncode = self.child.poll()
        if returncode is None:
            if self.timeout_s is not None and time.monotonic() - self.started_at > self.timeout_s:
                logger.error("Inference timed out after %.0f s; killing process %s", self.timeout_s, self.child.pid)
                self._timed_out = True
                self.child.kill_tree()
            return False

        self._drain_output()
        self.returncode = returncode
        if self._cancel_requested:
            self.state = JobState.CANCELLED
        elif self._timed_out or returncode != 0:
            self.state = JobState.FAILED
        else:
            self.state = JobState.SUCCEEDED
        logger.info("Inference process %s finished: %s (exit status %d)", self.child.pid, self.state.value, returncode)
        return True

    def cancel(self) -> None:
        """Kill the child process tree, so that the next ``poll()`` reports the job as cancelled."""
        if self.finished:
            return
        logger.info("Cancelling inference process %s", self.child.pid)
        self._cancel_requested = True
        self.child.kill_tree()

    def failure_message(self) -> str:
        """Return the child's own error message, for a job that failed.

        The message of the child's final ``{"stage": "error"}`` line comes first, then the
        last non-empty stderr line (the exception line of an unexpected traceback), then
        the exit status alone.
        """
        if self._timed_out:
            return f"The inference process did not finish within {self.timeout_s:.0f} s and was stopped"
        message = self.child_error_message()
        if message:
            return message
        return f"The inference process exited with status {self.returncode} and printed no error message"

    def child_error_message(self) -> Optional[str]:
        """Return the error message that the child printed, or ``None`` if it printed none."""
        if self.error_event is not None and self.error_event.message:
            return self.error_event.message
        for line in reversed(self.stderr_lines):
            if line.strip():
                return line.strip()
        return None

    def report(self, fraction: float, message: str) -> None:
        """Pass ``(fraction, message)`` to the progress callback, if any."""
        if self.progress_callback is not None:
            self.progress_callback(fraction, message)

    def _drain_output(self) -> None:
        for line in self.child.read_stderr_lines():
            if line.strip():
                logger.info("inference stderr: %s", line)
            self.stderr_lines.append(line)

        for line in self.child.read_stdout_lines():
            event = parse_progress_line(line)
            if event is None:
                if line.strip():
                    logger.info("inference: %s", line)
                    self.output_lines.append(line)
                continue

            logger.debug("inference progress %s %.3f %s", event.stage, event.fraction, event.message)
            if event.is_error:
                self.error_event = event
                logger.error("Inference process reported an error: %s", event.message)
                continue
            self.last_event = event
            self.report(CHILD_PROGRESS_SHARE * event.fraction, event.message)
