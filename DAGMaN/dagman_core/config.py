"""Typed DAGMaN configuration, loaded from a named preset or a YAML file and validated on load."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

import yaml

PRESET_DIR = Path(__file__).parent / "presets"

BACKBONES = ("swin", "vit")
MASKING_MODES = ("attention", "random", "block", "attention_high", "attention_low")
HINT_MODES = ("top", "sampled")
ATTENTION_SOURCES = ("noisy_teacher", "clean_teacher", "student")
DROPOUT_GRIDS = ("patch", "cell")
HEAD_SHARING = ("separate", "shared")
SA_STAGES = (1, 2, 3, 4)
PRECISIONS = ("auto", "bf16", "fp32")


class ConfigError(ValueError):
    """An invalid configuration key or value."""


@dataclass
class ModelConfig:
    """Backbone and semantic-attention (SA) block sizes.

    ``backbone: swin`` uses ``embed_dim`` .. ``drop_path`` and puts the SA block after ``sa_stage``
    (1-4; the mask grid is that stage's token grid). ``backbone: vit`` uses the ``vit_*`` sizes: the ViT
    has its own [CLS] token, its mask grid is its patch grid, and S_ATT comes from its last block.
    """

    backbone: str = "swin"
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
    vit_patch_size: int = 16
    vit_depth: int = 12
    vit_width: int = 768
    vit_heads: int = 8
    vit_mlp_ratio: float = 4.0


@dataclass
class DataConfig:
    """Preprocessing: RAS orientation, isotropic spacing in mm and the HU window scaled to [0, 1].

    ``cache_dir`` stores each volume's preprocessed copy on disk (default: ``cache`` in the run folder);
    runs that share a cache folder preprocess each volume once. ``num_workers`` loader processes read
    and crop volumes.
    """

    crop_size: int = 128
    spacing_mm: float = 2.0
    hu_window: tuple[float, float] = (-1000.0, 1000.0)
    cache_dir: str = ""
    num_workers: int = 2


@dataclass
class MaskingConfig:
    """Masking of the student's views and patch dropout of the teacher's views.

    ``mode`` picks the method: ``attention`` (DAGMaN, with ``hints``), ``random`` (SMIT), ``block``
    (iBOT's block masking in 3D), ``attention_high`` (AttMask without hints) and ``attention_low`` (MST).
    ``attention_source`` names the network whose S_ATT ranks the cells. ``block_min_cells`` and
    ``block_min_aspect`` shape the blocks of ``block`` mode.
    """

    mode: str = "attention"
    ratio: float = 0.7
    hint_ratio: float = 0.1
    hints: str = "top"
    attention_source: str = "noisy_teacher"
    noisy_teacher: bool = True
    teacher_dropout_ratio: float = 0.7
    teacher_dropout_grid: str = "patch"
    block_min_cells: int = 4
    block_min_aspect: float = 0.3


@dataclass
class LossConfig:
    """The four co-distillation terms (each can be switched off), DINO heads, temperatures and centering.

    ``heads: shared`` uses one DINO head for every token of the same width: the [CLS] and patch tokens
    on Swin, all three token kinds on ViT.
    """

    amip: bool = True
    ampd: bool = True
    aitd: bool = True
    gitd: bool = True
    amip_weight: float = 1.0
    ampd_weight: float = 0.1
    aitd_weight: float = 0.1
    gitd_weight: float = 0.1
    out_dim: int = 8192
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    heads: str = "separate"
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
    A step whose loss is NaN or infinite is skipped; ``max_nonfinite_steps`` of them in a row stop the run.

    ``precision`` is ``auto`` (bf16 autocast on a CUDA GPU that supports it, else fp32), ``bf16`` or
    ``fp32``. ``checkpoint_activations`` recomputes the student's Swin stages (or ViT blocks) in the
    backward pass to save memory, and ``compile`` runs the student through ``torch.compile``. A
    checkpoint is written every ``checkpoint_every_steps``; the newest ``keep_last_checkpoints`` are
    kept, and so is every one at a multiple of ``keep_every_steps``.
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
    max_nonfinite_steps: int = 10
    seed: int = 0
    precision: str = "auto"
    checkpoint_activations: bool = False
    compile: bool = False
    checkpoint_every_steps: int = 500
    keep_last_checkpoints: int = 3
    keep_every_steps: int = 10000


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
        """Raise ``ConfigError`` for a value that no DAGMaN run can use, naming the valid choices."""
        model, data, masking, loss = self.model, self.data, self.masking, self.loss
        _choose("model.backbone", model.backbone, BACKBONES)
        _check_positive(self)
        if model.backbone == "swin":
            if len(model.depths) != 4 or len(model.num_heads) != 4:
                raise ConfigError(
                    f"model.depths {list(model.depths)} and model.num_heads {list(model.num_heads)} "
                    "must each list 4 Swin stages"
                )
            _choose("model.sa_stage", model.sa_stage, SA_STAGES)
            multiple = 32
        else:
            if model.vit_width % model.vit_heads:
                raise ConfigError(f"model.vit_width {model.vit_width} must be divisible by model.vit_heads {model.vit_heads}")
            if model.vit_depth < 1:
                raise ConfigError(f"model.vit_depth {model.vit_depth} must be at least 1")
            if model.vit_patch_size != 16:
                raise ConfigError(
                    f"model.vit_patch_size {model.vit_patch_size} is invalid; valid choices: [16] "
                    "(the UNETR decoder upsamples the patch grid 16-fold)"
                )
            multiple = model.vit_patch_size
        for key, crop in (("data.crop_size", data.crop_size), ("finetune.crop_size", self.finetune.crop_size)):
            if crop <= 0 or crop % multiple:
                raise ConfigError(f"{key} {crop} must be a positive multiple of {multiple} for the {model.backbone} backbone")

        _choose("masking.mode", masking.mode, MASKING_MODES)
        _choose("masking.hints", masking.hints, HINT_MODES)
        _choose("masking.attention_source", masking.attention_source, ATTENTION_SOURCES)
        _choose("masking.teacher_dropout_grid", masking.teacher_dropout_grid, DROPOUT_GRIDS)
        for key in ("ratio", "hint_ratio", "teacher_dropout_ratio"):
            value = getattr(masking, key)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"masking.{key} {value} must lie in [0, 1)")
        if masking.hint_ratio > masking.ratio:
            raise ConfigError(
                f"masking.hint_ratio {masking.hint_ratio} must not exceed masking.ratio {masking.ratio}"
            )
        if masking.block_min_cells < 1:
            raise ConfigError(f"masking.block_min_cells {masking.block_min_cells} must be at least 1")
        if not 0.0 < masking.block_min_aspect <= 1.0:
            raise ConfigError(f"masking.block_min_aspect {masking.block_min_aspect} must lie in (0, 1]")

        _choose("loss.heads", loss.heads, HEAD_SHARING)
        if not any((loss.amip, loss.ampd, loss.aitd, loss.gitd)):
            raise ConfigError("every loss term is switched off; keep at least one of loss.amip, loss.ampd, loss.aitd, loss.gitd")
        _choose("train.precision", self.train.precision, PRECISIONS)
        if self.data.num_workers < 0:
            raise ConfigError(f"data.num_workers {self.data.num_workers} must be 0 or more")
        if self.train.max_nonfinite_steps < 1:
            raise ConfigError(f"train.max_nonfinite_steps {self.train.max_nonfinite_steps} must be at least 1")
        low, high = data.hu_window
        if not low < high:
            raise ConfigError(f"data.hu_window {list(data.hu_window)} must be [lower HU, upper HU] with lower < upper")


POSITIVE_KEYS = {
    "model": ("in_channels", "embed_dim", "depths", "num_heads", "window_size", "patch_size", "sa_depth", "sa_heads",
              "sa_mlp_ratio", "vit_width", "vit_heads", "vit_mlp_ratio"),
    "data": ("spacing_mm",),
    "loss": ("out_dim", "head_hidden_dim", "head_bottleneck_dim", "student_temperature", "teacher_temperature",
             "teacher_temperature_final"),
    "train": ("batch_size", "epochs", "lr", "lr_reference_batch", "checkpoint_every_steps", "keep_last_checkpoints",
              "keep_every_steps"),
    "finetune": ("batch_size", "lr", "steps"),
}


def _check_positive(config: DAGMaNConfig) -> None:
    """Raise ``ConfigError`` for a size, count, rate or temperature that is zero or negative."""
    for section, keys in POSITIVE_KEYS.items():
        for key in keys:
            value = getattr(getattr(config, section), key)
            values = value if isinstance(value, tuple) else (value,)
            if any(item <= 0 for item in values):
                raise ConfigError(f"{section}.{key} {list(values) if isinstance(value, tuple) else value} must be positive")



def cell_voxels(config: DAGMaNConfig) -> int:
    """Return the side of one mask cell in voxels: a token of the SA stage (Swin) or a ViT patch.

    16 for the paper's Swin (patch 2, stage 3) and for the paper's ViT (patch 16).
    """
    model = config.model
    if model.backbone == "vit":
        return model.vit_patch_size
    return model.patch_size * 2**model.sa_stage


def mask_grid_tokens(config: DAGMaNConfig) -> int:
    """Return N, the number of mask cells of a pretraining crop (512 for 128^3 crops and 16^3 cells)."""
    return (config.data.crop_size // cell_voxels(config)) ** 3


def _choose(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key} {value!r} is invalid; valid choices: {list(choices)}")


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
            item_type = get_args(hint)[0]
            kwargs[key] = tuple(_scalar(item, item_type, f"{path} item") for item in value)
        else:
            kwargs[key] = _scalar(value, hint, path)
    return cls(**kwargs)


def _scalar(value: Any, hint: type, path: str) -> Any:
    """Check ``value`` against the field type ``hint`` and convert ints and numeric strings to float.

    YAML 1.1 reads ``1e-4`` (no dot) as a string, so numeric strings are accepted for float fields.
    A bool is never accepted as a number.
    """
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path} must be a number, got {value!r}") from None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise ConfigError(f"{path} must be of type {hint.__name__}, got {value!r}")
    return value


def preset_names() -> list[str]:
    """Return the names of the presets shipped with the package."""
    return sorted(path.stem for path in PRESET_DIR.glob("*.yaml"))


def _read_values(preset_or_path: str | os.PathLike, with_base: bool = True, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read the raw values of a preset or YAML file.

    With ``with_base`` the file's values are merged over those of the ``base`` preset it names.
    Without it, only the keys written in the file itself are returned.
    """
    path = Path(preset_or_path)
    if not path.suffix and not path.is_file():
        path = PRESET_DIR / f"{preset_or_path}.yaml"
        if not path.exists():
            raise ConfigError(
                f"unknown preset {str(preset_or_path)!r}; valid presets: {preset_names()} or a YAML file path"
            )
    if not path.exists():
        raise ConfigError(f"configuration file not found: {path}")
    if str(path) in seen:
        raise ConfigError(f"presets name each other as base in a loop: {' -> '.join([*seen, str(path)])}")

    try:
        with open(path, encoding="utf-8") as stream:
            values = yaml.safe_load(stream) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path} must hold a mapping of configuration sections")
    base = values.pop("base", None)
    if base is None or not with_base:
        return values
    return merge_values(_read_values(base, True, (*seen, str(path))), values)


def merge_values(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in, section by section (lists are replaced whole)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into a nested mapping; the value is read as YAML (``0.6``, ``false``, ``[1, 2]``)."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise ConfigError(f"override {text!r} must read KEY=VALUE, e.g. masking.ratio=0.6")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({error})") from None
    nested: dict[str, Any] = value
    for part in reversed(key.strip().split(".")):
        nested = {part: nested}
    return nested


def load_config(*sources: str | os.PathLike, overrides: tuple[str, ...] | list[str] = ()) -> DAGMaNConfig:
    """Load and validate a configuration.

    The first source is read whole, including the preset it names as ``base``. Each later source
    changes only the keys written in its own file, so ``smit tiny_cpu`` is SMIT at tiny_cpu's sizes.
    With several sources the run is named after all of them, e.g. ``smit+tiny_cpu``. Each file
    contributes its ``name`` key or else its file name, and ``--set name=...`` chooses another.

    Args:
        sources: preset names (e.g. ``dagman_swin``) or YAML file paths, merged left to right.
        overrides: ``section.key=value`` strings applied last, e.g. ``masking.ratio=0.6``.
    """
    if not sources:
        raise ConfigError(f"name a preset ({preset_names()}) or a YAML file")
    values = _read_values(sources[0])
    names = [str(values.get("name", Path(sources[0]).stem))]
    for source in sources[1:]:
        update = _read_values(source, with_base=False)
        names.append(str(update.get("name", Path(source).stem)))
        values = merge_values(values, update)
    if len(sources) > 1:
        values["name"] = "+".join(names)
    for text in overrides:
        values = merge_values(values, parse_override(text))
    config = _build(DAGMaNConfig, values, "")
    config.validate()
    return config


def config_from_dict(values: dict[str, Any]) -> DAGMaNConfig:
    """Build and validate a configuration from a mapping such as one stored in a run folder."""
    config = _build(DAGMaNConfig, values, "")
    config.validate()
    return config
