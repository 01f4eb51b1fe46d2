"""Parsing of the JSON progress lines that the inference child process prints on stdout."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

ERROR_STAGE = "error"


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report of the child process.

    ``fraction`` is the completed share of the whole run, clamped to [0, 1].
    """

    stage: str
    fraction: float
    message: str

    @property
    def is_error(self) -> bool:
        return self.stage == ERROR_STAGE


def parse_progress_line(line: str) -> ProgressEvent | None:
    """Parse one stdout line into a ``ProgressEvent``.

    Returns ``None`` for any line that is not a JSON object with a string ``stage`` and a
    numeric ``fraction`` (library warnings, plain prints), so that the caller can log it
    as ordinary output. A missing ``message`` becomes the empty string.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        payload = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(payload, dict):
        return None

    stage = payload.get("stage")
    fraction = payload.get("fraction")
    if not isinstance(stage, str):
        return None
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or math.isnan(fraction):
        return None

    message = payload.get("message", "")
    if not isinstance(message, str):
        message = str(message)
    return ProgressEvent(stage=stage, fraction=min(max(float(fraction), 0.0), 1.0), message=message)
