"""Pretraining data: an on-disk cache of preprocessed volumes, seeded random views and per-step batches.

Every random draw of a sample (its crops, flips, intensity changes and masks) comes from a seed made of
the run's seed, the epoch and the volume's index. A sample is therefore the same whichever process,
loader worker or resumed run draws it, which makes resumption exact and lets a batch split over several
processes match the same batch in one process.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path

import numpy as np
import torch
from monai.data import PersistentDataset
from torch.utils.data import Dataset, Sampler

from dagman_core.config import DAGMaNConfig
from dagman_core.data.transforms import pretraining_transforms

from .runs import progress_bar

logger = logging.getLogger(__name__)


def cache_folder(config: DAGMaNConfig, run_dir: Path) -> Path:
    """Return the cache folder for ``config``'s preprocessing.

    The folder name carries the spacing and HU window, so runs with other preprocessing never read
    each other's cached volumes.

    NOTE: MONAI keys each cached volume by its datalist entry (the path), not by the file's content.
    After replacing a file in place, delete the cache folder.
    """
    data = config.data
    root = Path(data.cache_dir) if data.cache_dir else Path(run_dir) / "cache"
    low, high = data.hu_window
    key = f"ras-{data.spacing_mm:g}mm-hu{low:g}_{high:g}-crop{data.crop_size}"
    return root / key


def sample_seed(run_seed: int, epoch: int, index: int) -> int:
    """Return the 63-bit seed of volume ``index``'s sample in ``epoch``."""
    state = np.random.SeedSequence([run_seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


class PretrainingViews(Dataset):
    """Two random views of each cached volume, drawn from a seed per (epoch, volume).

    Indices are ``epoch * len(cases) + volume index`` (what ``StepBatchSampler`` yields). Each item has
    ``view_u`` and ``view_v`` (1, C, C, C) and ``seed``, from which the training step seeds the masks.
    """

    def __init__(self, cases: list[dict], config: DAGMaNConfig, cache_dir: Path):
        deterministic, self.random_views = pretraining_transforms(config)
        self.cases = cases
        self.cache = PersistentDataset(cases, deterministic, cache_dir=cache_dir)
        self.seed = config.train.seed

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, encoded: int) -> dict:
        epoch, index = divmod(int(encoded), len(self.cases))
        seed = sample_seed(self.seed, epoch, index)
        self.random_views.set_random_state(seed=seed % 2**32)
        views = self.random_views(self.cache[index])
        return {"view_u": views["view_u"], "view_v": views["view_v"], "seed": seed}


def prepare_cases(cases: list[dict], config: DAGMaNConfig, cache_dir: Path, show_progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Preprocess every volume into the cache once; return ``(usable cases, skipped)``.

    A volume that fails to load or preprocess is left out with one warning that names the file; each
    skipped entry has ``image`` and ``error``. Volumes already in the cache are only read back.
    """
    deterministic, _ = pretraining_transforms(config)
    cache = PersistentDataset(cases, deterministic, cache_dir=cache_dir)
    usable, skipped = [], []
    bar = progress_bar(len(cases), "preprocess", show_progress)
    try:
        for index, case in enumerate(cases):
            try:
                cache[index]
                usable.append(case)
            except Exception as error:  # noqa: BLE001 - any unreadable volume is skipped the same way
                message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                logger.warning("skipping %s: it cannot be loaded (%s)", case.get("image"), message)
                skipped.append({"image": str(case.get("image")), "error": message})
            bar.update(1)
    finally:
        bar.close()
    return usable, skipped


class StepBatchSampler(Sampler[list[int]]):
    """Yield this process's batch of sample indices for each step from ``start_step`` to ``total_steps``.

    Each epoch shuffles the volumes with a seed of its own and cuts them into global batches of
    ``batch_size * world_size``. The last batch of an epoch wraps around to the epoch's start. Process
    ``rank`` takes every ``world_size``-th sample of each global batch, so one process with batch
    ``B * W`` sees the same samples per step as ``W`` processes with batch ``B``.
    """

    def __init__(self, num_cases: int, batch_size: int, world_size: int, rank: int, seed: int, start_step: int, total_steps: int):
        self.num_cases = num_cases
        self.global_batch = batch_size * world_size
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.steps_per_epoch = math.ceil(num_cases / self.global_batch)

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def _order(self, epoch: int) -> list[int]:
        digest = hashlib.sha256(f"{self.seed}-{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        order = torch.randperm(self.num_cases, generator=generator).tolist()
        needed = self.steps_per_epoch * self.global_batch
        return (order * math.ceil(needed / self.num_cases))[:needed]

    def __iter__(self):
        epoch, order = None, []
        for step in range(self.start_step, self.total_steps):
            step_epoch, position = divmod(step, self.steps_per_epoch)
            if step_epoch != epoch:
                epoch, order = step_epoch, self._order(step_epoch)
            chunk = order[position * self.global_batch : (position + 1) * self.global_batch]
            yield [epoch * self.num_cases + index for index in chunk[self.rank :: self.world_size]]
