"""Typed DAGMaN configuration, loaded from a named preset or a YAML file and validated on load."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

MASKING_MODES = ("attention",)
HINT_MODES = ("top", "sampled")


class ConfigError(ValueError):
    """An invalid configuration key or value."""


@dataclass
class ModelConfig:
    """Swin backbone and semantic-attention (SA) block sizes."""

    in_channels: int = 1
    embed_dim: int = 48
    depths: tuple[int, ...] = (2, 2, 8, 2)
    num_heads: tuple[int, ...] = (4, 4, 8, 16)
    window_size: int = 4
    patch_size: int = 2
    drop_path: float = 0.1
    sa_stage: int = 3
    sa_depth: int = 2
    sa_heads: int = 8
    sa_mlp_ratio: float = 4.0


@dataclass
class DataConfig:
    """Preprocessing: RAS orientation, isotropic spacing in mm and the HU window scaled to [0, 1]."""

    crop_size: int = 128
    spacing_mm: float = 2.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)


@dataclass
class MaskingConfig:
    """Attention-guided masking of the student's views and patch dropout of the teacher's views."""

    mode: str = "attention"
    ratio: float = 0.7
    hint_ratio: float = 0.1
    hints: str = "top"
    noisy_teacher: bool = True
    teacher_dropout_ratio: float = 0.7


@dataclass
class LossConfig:
    """Weights of the four co-distillation terms, DINO head sizes, temperatures and centering."""

    amip_weight: float = 1.0
    ampd_weight: float = 0.1
    aitd_weight: float = 0.1
    gitd_weight: float = 0.1
    out_dim: int = 8192
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    student_temperature: float = 0.1
    teacher_temperature: float = 0.04
    teacher_temperature_final: float = 0.07
    teacher_temperature_warmup_epochs: int = 30
    center_momentum: float = 0.9


@dataclass
class TrainConfig:
    """Optimiser and schedules of pretraining. An epoch is one pass over the datalist's volumes.

    ``lr`` is the learning rate for a global batch of ``lr_reference_batch`` volumes, and a run scales it
    linearly with its own global batch. The MIDL 2025 DAGMaN paper used 8e-4 on 4 GPUs.
    """

    batch_size: int = 2
    epochs: int = 800
    lr: float = 8e-4
    lr_reference_batch: int = 8
    min_lr: float = 1e-6
    warmup_epochs: int = 80
    weight_decay: float = 0.04
    weight_decay_final: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    ema_momentum: float = 0.996
    seed: int = 0


@dataclass
class FinetuneConfig:
    """Segmentation fine-tuning of the pretrained encoder with a SwinUNETR decoder."""

    crop_size: int = 96
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    steps: int = 20000
    positive_fraction: float = 0.5


@dataclass
class DAGMaNConfig:
    """The whole configuration of one DAGMaN run."""

    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict[str, Any]:
        """Return the configuration as plain YAML-ready types (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def validate(self) -> None:
        """Raise ``ConfigError`` for a value that no DAGMaN run can use."""
        model, data, masking = self.model, self.data, self.masking
        if len(model.depths) != 4 or len(model.num_heads) != 4:
            raise ConfigError(
                f"model.depths {list(model.depths)} and model.num_heads {list(model.num_heads)} "
                "must each list 4 Swin stages"
            )
        if model.sa_stage != 3:
            raise ConfigError(f"model.sa_stage {model.sa_stage} is not supported yet; valid choices: [3]")
        if data.crop_size % 32 != 0:
            raise ConfigError(f"data.crop_size {data.crop_size} must be divisible by 32 (e.g. 64, 96, 128)")
        if self.finetune.crop_size % 32 != 0:
            raise ConfigError(f"finetune.crop_size {self.finetune.crop_size} must be divisible by 32")
        if masking.mode not in MASKING_MODES:
            raise ConfigError(f"masking.mode {masking.mode!r} is invalid; valid choices: {list(MASKING_MODES)}")
        if masking.hints not in HINT_MODES:
            raise ConfigError(f"masking.hints {masking.hints!r} is invalid; valid choices: {list(HINT_MODES)}")
        for key in ("ratio", "hint_ratio", "teacher_dropout_ratio"):
            value = getattr(masking, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"masking.{key} {value} must lie in [0, 1)")
        if masking.hint_ratio > masking.ratio:
            raise ConfigError(
                f"masking.hint_ratio {masking.hint_ratio} must not exceed masking.ratio {masking.ratio}"
            )
        low, high = data.hu_window
        if not low < high:
            raise ConfigError(f"data.hu_window {list(data.hu_window)} must be [lower HU, upper HU] with lower < upper")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``values``, rejecting unknown keys with the valid ones named."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'configuration'} must be a mapping, got {type(values).__name__}")
    hints = get_type_hints(cls)
    known = {item.name for item in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'configuration'}; valid keys: {sorted(known)}")

    kwargs = {}
    for key, value in values.items():
        hint = hints[key]
        path = f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        elif getattr(hint, "__origin__", None) is tuple:
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{path} must be a list, got {value!r}")
            kwargs[key] = tuple(value)
        elif hint is float and isinstance(value, int) and not isinstance(value, bool):
            kwargs[key] = float(value)
        elif hint in (int, float, str, bool) and not isinstance(value, hint):
            raise ConfigError(f"{path} must be of type {hint.__name__}, got {value!r}")
        else:
            kwargs[key] = value
    return cls(**kwargs)


def preset_names() -> list[str]:
    """Return the names of the presets shipped with the package."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def load_config(preset_or_path: str | os.PathLike) -> DAGMaNConfig:
    """Load a configuration from a preset name (e.g. ``tiny_cpu``) or a YAML file path, and validate it."""
    path = Path(preset_or_path)
    if not path.suffix and not path.exists():
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown preset {str(preset_or_path)!r}; valid presets: {preset_names()} or a YAML file path"
            )
    if not path.exists():
        raise ConfigError(f"configuration file not found: {path}")

    with open(path, encoding="utf-8") as stream:
        values = yaml.safe_load(stream) or {}
    config = _build(DAGMaNConfig, values, "")
    config.validate()
    return config


def config_from_dict(values: dict[str, Any]) -> DAGMaNConfig:
    """Build and validate a configuration from a mapping such as one stored in a run folder."""
    config = _build(DAGMaNConfig, values, "")
    config.validate()
    return config
