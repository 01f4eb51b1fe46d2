"""The module panel's state machine: allowed moves and what each state shows."""

from __future__ import annotations

import pytest

import slicer_fixtures  # noqa: F401 (puts the module folders on sys.path)
from DAGMaNLib.state import TRANSITIONS, InvalidTransition, PanelState, PanelStateMachine


def test_run_then_cancel_returns_to_idle():
    panel = PanelStateMachine()
    assert panel.controls(inputs_ready=False).apply_enabled is False
    assert panel.controls(inputs_ready=True).apply_text == "Apply"

    panel.to(PanelState.RUNNING, "Segmenting")
    controls = panel.controls(inputs_ready=True)
    assert (controls.apply_text, controls.apply_enabled, controls.inputs_enabled) == ("Cancel", True, False)
    assert panel.running

    panel.to(PanelState.CANCELLING)
    assert panel.controls(inputs_ready=True).apply_enabled is False
    with pytest.raises(InvalidTransition, match="from cancelling to running"):
        panel.to(PanelState.RUNNING)

    panel.to(PanelState.IDLE, "Cancelled")
    assert not panel.running
    assert panel.message == "Cancelled"


def test_install_then_run_then_fail_then_run_again():
    panel = PanelStateMachine()
    panel.to(PanelState.INSTALLING)
    controls = panel.controls(inputs_ready=True)
    assert (controls.apply_text, controls.apply_enabled, controls.busy) == ("Installing...", False, True)

    panel.to(PanelState.RUNNING)
    panel.to(PanelState.FAILED, "The model needs 12 GiB")
    assert panel.controls(inputs_ready=True).apply_enabled
    panel.to(PanelState.RUNNING)
    panel.to(PanelState.DONE)
    assert panel.controls(inputs_ready=True).inputs_enabled


def test_done_cannot_be_reached_without_a_run():
    panel = PanelStateMachine()
    with pytest.raises(InvalidTransition):
        panel.to(PanelState.DONE)
    with pytest.raises(InvalidTransition):
        panel.to(PanelState.CANCELLING)


def test_every_state_has_moves_and_controls():
    assert set(TRANSITIONS) == set(PanelState)
    panel = PanelStateMachine()
    for state in PanelState:
        panel.state = state
        assert TRANSITIONS[state]
        assert panel.controls(inputs_ready=True).apply_text
