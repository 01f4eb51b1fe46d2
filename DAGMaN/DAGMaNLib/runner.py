"""Child process runner: starts a command, collects its output without blocking, kills its process tree.

The logic talks to the child process only through the ``ProcessRunner`` and ``ChildProcess``
protocols below, so tests can pass a fake runner that writes outputs in-process, or a
``SubprocessRunner`` subclass that starts a different command.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import threading
import time
from typing import IO, Mapping, Protocol, Sequence

logger = logging.getLogger(__name__)



class ChildProcess(Protocol):
    """A started child process, as seen by the logic."""

    @property
    def pid(self) -> int | None:
        """Process id, or ``None`` for an in-process fake."""

    def poll(self) -> int | None:
        """Return the exit status once the process has exited and all its output was read, else ``None``."""

    def read_stdout_lines(self) -> list[str]:
        """Return the stdout lines received since the last call, without blocking."""

    def read_stderr_lines(self) -> list[str]:
        """Return the stderr lines received since the last call, without blocking."""

    def kill_tree(self) -> None:
        """Kill the process and every process it started."""


class ProcessRunner(Protocol):
    """Starts child processes."""

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> ChildProcess:
        """Start ``command`` with environment ``env`` (``None``: inherit this process's environment)."""


def kill_process_tree(pid: int, timeout_s: float = 5.0) -> list[int]:
    """Kill process ``pid`` and all its descendants, and wait up to ``timeout_s`` seconds for them to exit.

    The descendants are listed before anything is killed, because a killed parent's children
    are re-parented and no longer show up in ``psutil.Process.children``. On POSIX the process
    group led by ``pid`` is killed too, which also reaches descendants that were started after
    the listing. A zombie counts as exited. Returns the pids that were signalled.

    psutil is imported here, not at module level, so that the module still loads in a Slicer
    whose Python lacks it. Without psutil only the process group (POSIX) or ``taskkill /T``
    (Windows) stops the tree, and the returned list contains ``pid`` alone.
    """
    try:
        import psutil
    except ImportError:
        logger.warning("psutil is not installed; stopping process %d and its group without it", pid)
        _kill_tree_without_psutil(pid)
        return [pid]

    try:
        parent = psutil.Process(pid)
        processes = [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []

    if os.name == "posix":
        _kill_process_group(pid)

    killed = []
    for process in processes:
        try:
            process.kill()
            killed.append(process.pid)
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied as error:
            logger.warning("Could not kill process %d: %s", process.pid, error)

    alive = _wait_until_exited(processes, timeout_s)
    for process in alive:
        logger.warning("Process %d is still running %.1f s after it was killed", process.pid, timeout_s)
    return killed


def _kill_tree_without_psutil(pid: int) -> None:
    if os.name == "posix":
        _kill_process_group(pid)
        return
    subprocess.run(
        ["taskkill", "/T", "/F", "/PID", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def _kill_process_group(pid: int) -> None:
    """Kill the process group that ``pid`` leads, unless ``pid`` is no group leader or leads this process's group."""
    try:
        if os.getpgid(pid) != pid or os.getpgid(0) == pid:
            return
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until_exited(processes: list, timeout_s: float) -> list:
    """Wait until every ``psutil.Process`` has exited or is a zombie, and return those still running at the timeout."""
    import psutil

    deadline = time.monotonic() + timeout_s
    while True:
        alive = []
        for process in processes:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


class SubprocessChild:
    """A ``subprocess.Popen`` child whose stdout and stderr are read by two daemon threads.

    The threads only queue the lines. The caller's thread takes them with ``read_*_lines``,
    so logging and progress callbacks run in the thread that owns the scene and the widgets.
    """

    def __init__(self, popen: subprocess.Popen):
        self._popen = popen
        self._stdout_queue: queue.Queue[str] = queue.Queue()
        self._stderr_queue: queue.Queue[str] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read_lines, args=(popen.stdout, self._stdout_queue), daemon=True),
            threading.Thread(target=self._read_lines, args=(popen.stderr, self._stderr_queue), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int | None:
        return self._popen.pid

    def poll(self) -> int | None:
        returncode = self._popen.poll()
        if returncode is None:
            return None

        # The pipes close when the process exits unless a grandchild inherited them, so the
        # join has a timeout that keeps such a grandchild from blocking the caller.
        for reader in self._readers:
            reader.join(timeout=1.0)
        return returncode

    def read_stdout_lines(self) -> list[str]:
        return _drain(self._stdout_queue)

    def read_stderr_lines(self) -> list[str]:
        return _drain(self._stderr_queue)

    def kill_tree(self) -> None:
        if self._popen.poll() is not None:
            return
        killed = kill_process_tree(self._popen.pid)
        logger.info("Killed inference process tree: pids %s", killed)

        # Reap the direct child so that it does not stay a zombie.
        try:
            self._popen.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            logger.warning("Inference process %d did not exit after it was killed", self._popen.pid)

    @staticmethod
    def _read_lines(stream: IO[str], lines: queue.Queue) -> None:
        for line in stream:
            lines.put(line.rstrip("\r\n"))
        stream.close()


def _drain(lines: queue.Queue) -> list[str]:
    drained = []
    while True:
        try:
            drained.append(lines.get_nowait())
        except queue.Empty:
            return drained


class SubprocessRunner:
    """Starts the command as a real child process with piped stdout and stderr (UTF-8 text)."""

    def start(self, command: Sequence[str], env: Mapping[str, str] | None = None) -> SubprocessChild:
        options: dict = {}
        if os.name == "nt":
            # Hide the console window and give the child its own process group.
            startupinfo = subprocess.STARTUPINFO()
            startupinfo.dwFlags |= subprocess.STARTF_USESHOWWINDOW
            startupinfo.wShowWindow = 0
            options["startupinfo"] = startupinfo
            options["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            options["start_new_session"] = True

        popen = subprocess.Popen(
            list(command),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **options,
        )
        logger.info("Started process %d: %s", popen.pid, subprocess.list2cmdline(list(command)))
        return SubprocessChild(popen)
