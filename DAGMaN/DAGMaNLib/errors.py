"""Exceptions raised by the DAGMaN Slicer logic."""

from __future__ import annotations


class DAGMaNError(RuntimeError):
    """Base class of the errors that the DAGMaN module reports to the user."""


class InferenceError(DAGMaNError):
    """The inference child process failed, or its outputs could not be loaded.

    ``child_message`` is the message that the child process printed: the message of its
    final ``{"stage": "error"}`` progress line, or else the last line of its stderr.
    ``returncode`` is its exit status. Both are ``None`` when the failure happened in this
    process, for example on an invalid ``result.json``.
    """

    def __init__(self, message: str, *, returncode: int | None = None, child_message: str | None = None):
        super().__init__(message)
        self.returncode = returncode
        self.child_message = child_message


class InferenceCancelled(DAGMaNError):
    """The user cancelled the inference before it finished."""


class ResultFormatError(InferenceError):
    """``result.json`` or an output image does not follow the inference output contract."""
