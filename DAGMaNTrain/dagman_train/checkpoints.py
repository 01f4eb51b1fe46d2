"""Training checkpoints: atomic writes, retention of the last K plus every Nth, and the newest complete one."""

from __future__ import annotations

import logging
import random
import re
from pathlib import Path

import numpy as np
import torch

from .runs import atomic_torch_save

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})\.pt$")


def checkpoint_path(run_dir: Path, step: int) -> Path:
    """Return the path of the checkpoint taken after ``step`` steps, e.g. ``checkpoints/checkpoint-00000500.pt``."""
    return Path(run_dir) / CHECKPOINT_DIR / f"checkpoint-{step:08d}.pt"


def list_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """Return ``(steps done, path)`` of every checkpoint file in the run folder, oldest first."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: Path, step: int, state: dict, keep_last: int, keep_every: int) -> Path:
    """Write ``state`` atomically as the checkpoint after ``step`` steps, then prune older ones.

    The newest ``keep_last`` checkpoints are kept, and so is every one whose step is a multiple of
    ``keep_every``.
    """
    path = checkpoint_path(run_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state, path)

    existing = list_checkpoints(run_dir)
    newest = {found for found, _ in existing[-keep_last:]}
    for found, old_path in existing:
        if found not in newest and found % keep_every != 0:
            old_path.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run_dir: Path) -> tuple[dict, Path] | None:
    """Return the newest checkpoint that loads, with its path, or None when the run folder has none.

    A file that fails to load (a disk that filled up, a copy cut short) is skipped with a warning, and
    the next older one is tried.
    """
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False), path
        except Exception as error:  # noqa: BLE001 - any unreadable file is skipped the same way
            logger.warning("checkpoint %s cannot be read (%s); trying an older one", path, error)
    return None


def random_states() -> dict:
    """Capture the state of every random generator the training loop draws from in this process."""
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_random_states(states: dict) -> None:
    """Restore generator states captured by ``random_states``."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
