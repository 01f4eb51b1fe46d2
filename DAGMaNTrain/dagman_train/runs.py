"""Run folders: the resolved configuration, per-step metrics and atomic file writes."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import IO, Callable

import numpy as np
import torch
import yaml

from dagman_core.config import DAGMaNConfig, config_from_dict

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a CPU generator for the masking draws."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def write_atomically(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    A reader never sees a half-written file, and a failure leaves any earlier file in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def json_safe(value):
    """Return ``value`` with every NaN or infinite float replaced by None, so that it dumps as strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_atomically(path, lambda stream: stream.write(text.encode("utf-8")))


def atomic_torch_save(state: dict, path: str | os.PathLike) -> Path:
    """Save a torch checkpoint to ``path`` atomically."""
    return write_atomically(path, lambda stream: torch.save(state, stream))


def atomic_save_safetensors(state: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Save tensors as safetensors to ``path`` atomically."""
    from safetensors.torch import save

    tensors = {key: value.detach().cpu().contiguous() for key, value in state.items()}
    return write_atomically(path, lambda stream: stream.write(save(tensors)))


def write_config(run_dir: Path, config: DAGMaNConfig) -> None:
    """Store the resolved configuration as ``config.yaml`` in the run folder."""
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


def read_run_config(run_dir: str | os.PathLike) -> DAGMaNConfig:
    """Read ``config.yaml`` of a run folder."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"not a DAGMaN run folder: {path} is missing")
    with open(path, encoding="utf-8") as stream:
        return config_from_dict(yaml.safe_load(stream))


def finite_record(record: dict) -> dict:
    """Return ``record`` with NaN and infinite floats replaced by None, so that it is standard JSON."""
    return {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in record.items()}


class MetricsLog:
    """Write one JSON line per step to ``metrics.jsonl`` in the run folder.

    NaN and infinite values are written as ``null``, so that every line is standard JSON. With
    ``append=False`` an earlier file is replaced.
    """

    def __init__(self, path: Path, append: bool = True):
        self.path = path
        self.stream = open(path, "a" if append else "w", encoding="utf-8")

    def truncate_from(self, step: int) -> None:
        """Drop the lines of ``step`` and later, which a resumed run writes again."""
        self.stream.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] < step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self.stream = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.stream.write(json.dumps(finite_record(record)) + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def progress_bar(total: int, description: str, enabled: bool = True):
    """Return a tqdm bar on stderr; disabled when ``enabled`` is False or stderr is not a terminal in CI logs."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="step", disable=not enabled, file=sys.stderr, dynamic_ncols=True)
