"""The module panel's states and what each one shows, without Qt.

The widget owns one ``PanelStateMachine``. It moves it with ``to()`` and applies ``controls()``
to its buttons after each move. The button text, the enabled controls and the allowed moves are
therefore decided (and tested) here rather than spread over the widget's slots.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class PanelState(enum.Enum):
    IDLE = "idle"
    INSTALLING = "installing"
    RUNNING = "running"
    CANCELLING = "cancelling"
    DONE = "done"
    FAILED = "failed"


# Each state -> the states it may move to.
TRANSITIONS: dict[PanelState, frozenset] = {
    PanelState.IDLE: frozenset({PanelState.INSTALLING, PanelState.RUNNING, PanelState.FAILED}),
    PanelState.INSTALLING: frozenset({PanelState.IDLE, PanelState.RUNNING, PanelState.FAILED}),
    PanelState.RUNNING: frozenset({PanelState.CANCELLING, PanelState.DONE, PanelState.FAILED}),
    # A cancelled job always ends cancelled (idle); only an error while loading or cleaning up ends failed.
    PanelState.CANCELLING: frozenset({PanelState.IDLE, PanelState.FAILED}),
    PanelState.DONE: frozenset({PanelState.IDLE, PanelState.INSTALLING, PanelState.RUNNING, PanelState.FAILED}),
    PanelState.FAILED: frozenset({PanelState.IDLE, PanelState.INSTALLING, PanelState.RUNNING, PanelState.FAILED}),
}


class InvalidTransition(RuntimeError):
    """A move the panel does not allow, e.g. Apply while a run is being cancelled."""


@dataclass(frozen=True)
class PanelControls:
    """The panel's controls in one state.

    ``apply_text`` and ``apply_enabled`` are for the Apply/Cancel button, ``inputs_enabled`` for
    the volume, model and device choices, ``busy`` for the progress bar.
    """

    apply_text: str
    apply_enabled: bool
    inputs_enabled: bool
    busy: bool


class PanelStateMachine:
    """The current panel state and its allowed moves."""

    def __init__(self):
        self.state = PanelState.IDLE
        self.message = ""

    def to(self, state: PanelState, message: str = "") -> None:
        """Move to ``state`` with a status ``message``; raise ``InvalidTransition`` for a move not allowed."""
        if state not in TRANSITIONS[self.state]:
            raise InvalidTransition(f"The panel cannot go from {self.state.value} to {state.value}")
        self.state = state
        self.message = message

    @property
    def running(self) -> bool:
        """Whether a child process exists (running or being cancelled)."""
        return self.state in (PanelState.RUNNING, PanelState.CANCELLING)

    def controls(self, inputs_ready: bool) -> PanelControls:
        """Return the controls for the current state; ``inputs_ready`` is whether a volume and a model are chosen."""
        if self.state is PanelState.INSTALLING:
            return PanelControls("Installing...", apply_enabled=False, inputs_enabled=False, busy=True)
        if self.state is PanelState.RUNNING:
            return PanelControls("Cancel", apply_enabled=True, inputs_enabled=False, busy=True)
        if self.state is PanelState.CANCELLING:
            return PanelControls("Cancelling...", apply_enabled=False, inputs_enabled=False, busy=True)
        return PanelControls("Apply", apply_enabled=inputs_ready, inputs_enabled=True, busy=False)
