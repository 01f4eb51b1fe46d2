"""Estimate the peak memory of an inference run before it starts, and warn when it will not fit.

The estimate follows what ``dagman_core/inference/pipeline.py`` allocates, stage by stage, and
returns the largest stage. For a segmentation model these are the stages:

- preprocess: the input CT, its copy resampled to the network's isotropic RAS grid, and the
  HU-windowed tensor with its temporaries;
- sliding windows: the body box, MONAI's output accumulator (num_classes channels, float32) and
  its count map, the attention cell sums, and one window batch's activations;
- output resampling: the class probabilities on the network grid, each channel resampled onto the
  input grid, and ``np.argmax`` over the stacked channels, which makes a contiguous copy of the stack
  and returns int64 indices.

A classification model resamples the CT, cuts one crop, runs the encoder once and resamples the
attention onto the input grid. Every stage also includes a fixed process baseline (Python with
torch, MONAI and SimpleITK imported) and the model's weights.

Calibration: the activation factors below come from single forward passes measured in-process.
``benchmarks/inference_memory.py`` then runs the real inference child on real CTs and compares its
peak resident set size (``ru_maxrss``) with the whole estimate. It used random-weight bundles of
tiny_cpu (segmentation with 1 and 4 windows per pass, and classification), paper_swin and dagman_vit
(segmentation), on a CPU-only build of torch 2.13 with MONAI 1.6.1 (Linux x86-64). In two runs,
measured / estimate lay between 0.89 and 1.13. docs/benchmarks-inference-memory.md records each case.

NOTE: the CUDA split (what lives on the GPU, the CUDA context and the host memory of the CUDA
runtime) has not been measured on a GPU. Its constants are guesses.

Nothing here imports torch or Qt, so the module runs inside Slicer's process.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from .command import validate_device

MIB = 1024**2
GIB = 1024**3
FLOAT32_BYTES = 4
INT64_BYTES = 8

TASKS = ("segmentation", "classification")
SEGMENTATION_ARCHITECTURES = ("dagman_swin_unetr", "dagman_vit_unetr")
CLASSIFICATION_ARCHITECTURES = ("dagman_classifier",)

# Peak resident set of ``python -m dagman_core.inference`` once torch 2.13 (CPU build), MONAI 1.6.1,
# SimpleITK and the pipeline are imported, before any work: 466 MiB, measured with
# ``benchmarks/inference_memory.py`` (its "import-only" row) on Linux x86-64.
PROCESS_BASELINE_BYTES = 470 * MIB

# NOTE: guesses, not measured. A CUDA build of torch maps more libraries into the process,
# and the CUDA context takes GPU memory that torch's allocator does not count (drivers differ).
CUDA_HOST_RUNTIME_BYTES = 1 * GIB
CUDA_CONTEXT_BYTES = 600 * MIB

# MONAI's UNETR uses feature_size 16 by default, and DAGMaNViTSegmenter keeps that default.
UNETR_FEATURE_SIZE = 16

# Activations of one forward pass in inference mode, as multiples of the window's float32 voxels
# times a feature width (the full-resolution channels of the decoder, or the Swin embedding width),
# plus a fixed part. Measured on a CPU build of torch 2.13 with oneDNN: SwinUNETR at 64^3, 96^3 and
# 128^3 windows and 1 to 4 windows per pass; UNETR at 96^3; the Swin encoder alone at 64^3 and 128^3.
SWIN_UNETR_ACTIVATION_FACTOR = 10.0
VIT_UNETR_ACTIVATION_FACTOR = 9.0
SWIN_ENCODER_ACTIVATION_FACTOR = 3.0
UNETR_FIXED_ACTIVATION_BYTES = 50 * MIB
# A ViT classifier's activations scale with its tokens (crop voxels / patch^3) times its width.
# NOTE: measured only in-process at 128^3 with ViT-B (dagman_vit), never through the inference child.
VIT_TOKEN_ACTIVATION_FACTOR = 50.0

# Share of the voxels on the network grid that lie in the body (above -500 HU). A classification
# crop in "whole" mode takes np.argwhere over them, which costs 48 bytes per body voxel at its peak.
BODY_VOXEL_FRACTION = 0.5

# memory_warning stays silent only when the estimate times this margin fits. The benchmark's measured
# peaks lay between 0.89 and 1.13 times the estimate, and the margin also covers scans and models
# that it did not run.
SAFETY_MARGIN = 1.25


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one inference run, in bytes.

    ``host_bytes`` is the peak resident set size of the inference process and ``gpu_bytes`` the peak
    GPU memory (0 on the CPU). Each breakdown maps a name to its bytes at that peak, and sums to the
    peak. ``host_stage`` and ``gpu_stage`` name the pipeline stage where each peak occurs. ``task``
    is the model's task from model.json.
    """

    device: str
    host_bytes: int
    gpu_bytes: int
    host_breakdown: Mapping[str, int] = field(default_factory=dict)
    gpu_breakdown: Mapping[str, int] = field(default_factory=dict)
    host_stage: str = ""
    gpu_stage: str = ""
    task: str = "segmentation"

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def total_bytes(self) -> int:
        """Host and GPU peaks added together."""
        return self.host_bytes + self.gpu_bytes

    @property
    def device_bytes(self) -> int:
        """Peak memory on the chosen device: GPU memory for CUDA, host memory for the CPU."""
        return self.gpu_bytes if self.is_cuda else self.host_bytes

    @property
    def breakdown(self) -> dict[str, int]:
        """Name -> bytes at the peak. On CUDA the names start with "GPU " or "RAM "."""
        if not self.is_cuda:
            return dict(self.host_breakdown)
        merged = {f"GPU {name}": value for name, value in self.gpu_breakdown.items()}
        merged.update({f"RAM {name}": value for name, value in self.host_breakdown.items()})
        return merged

    def describe(self, available_bytes: int | None = None) -> str:
        """Return a one-line summary in GiB, such as "about 2.1 GiB on cpu; 14 GiB available".

        ``available_bytes`` is the free memory of the chosen device (``available_memory``).
        """
        if self.is_cuda:
            text = f"about {format_gib(self.gpu_bytes)} of GPU memory on {self.device} and {format_gib(self.host_bytes)} of RAM"
        else:
            text = f"about {format_gib(self.host_bytes)} on {self.device}"
        if available_bytes is not None:
            text += f"; {format_gib(available_bytes)} available"
        return text


def format_gib(size_bytes: int) -> str:
    """Return ``size_bytes`` in GiB: one decimal below 10 GiB, whole GiB from there on."""
    gib = size_bytes / GIB
    if gib >= 10:
        return f"{gib:.0f} GiB"
    return f"{max(gib, 0.1):.1f} GiB"


# ---------------------------------------------------------------------------------------------
# Checks of the inputs


def _validate_geometry(volume_shape_ijk: Sequence[int], spacing_mm_ijk: Sequence[float]) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Return the shape as ints and the spacing as floats; numpy scalars are accepted."""
    shape = tuple(volume_shape_ijk)
    spacing = tuple(spacing_mm_ijk)
    if len(shape) != 3 or any(isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1 for size in shape):
        raise ValueError(f"invalid volume shape {shape!r}; give three positive voxel counts (I, J, K)")
    if len(spacing) != 3 or any(
        isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0
        for value in spacing
    ):
        raise ValueError(f"invalid voxel spacing {spacing!r}; give three positive spacings in mm (I, J, K)")
    return tuple(int(size) for size in shape), tuple(float(value) for value in spacing)


def _validate_device(device: str) -> str:
    if device == "auto":
        raise ValueError("device 'auto' cannot be estimated. Pass 'cuda' when the GPU probe found a GPU, else 'cpu'")
    return validate_device(device)


def _section(mapping: Mapping, key: str, where: str) -> Mapping:
    value = mapping.get(key) if isinstance(mapping, Mapping) else None
    if not isinstance(value, Mapping):
        raise ValueError(f"invalid model.json: {where}{key!r} is missing or not a mapping")
    return value


def _positive_int(mapping: Mapping, key: str, where: str) -> int:
    value = mapping.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"invalid model.json: {where}{key} is {value!r}, expected a positive integer")
    return value


def _positive_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"invalid model.json: {name} is {value!r}, expected a positive number")
    return float(value)


@dataclass(frozen=True)
class _ModelFacts:
    """Values from model.json that the estimate uses."""

    task: str
    architecture: str
    backbone: str
    num_classes: int
    model: Mapping
    crop_voxels_side: int
    spacing_mm: float
    overlap: float
    pretrain_crop: int


def _read_model_facts(model_description: Mapping) -> _ModelFacts:
    """Check the parts of a parsed model.json that the estimate needs.

    Raises ValueError naming the first invalid or missing value.
    """
    if not isinstance(model_description, Mapping):
        raise ValueError(f"model description must be the parsed model.json (a dict), got {type(model_description).__name__}")
    task = model_description.get("task")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} in model.json; valid tasks: {', '.join(TASKS)}")

    architecture = _section(model_description, "architecture", "")
    kind = architecture.get("type")
    valid = SEGMENTATION_ARCHITECTURES if task == "segmentation" else CLASSIFICATION_ARCHITECTURES
    if kind not in valid:
        raise ValueError(f"unknown architecture {kind!r} for task {task!r} in model.json; valid: {', '.join(valid)}")
    num_classes = _positive_int(architecture, "num_classes", "architecture.")
    config = _section(architecture, "config", "architecture.")
    model = _section(config, "model", "architecture.config.")
    data = _section(config, "data", "architecture.config.")
    backbone = model.get("backbone")
    if backbone not in ("swin", "vit"):
        raise ValueError(f"unknown backbone {backbone!r} in model.json; valid: swin, vit")

    preprocessing = _section(model_description, "preprocessing", "")
    spacing = preprocessing.get("spacing_mm")
    if not isinstance(spacing, Sequence) or isinstance(spacing, str) or not spacing:
        raise ValueError(f"invalid model.json: preprocessing.spacing_mm is {spacing!r}, expected [mm, mm, mm]")
    crop = preprocessing.get("crop_size")
    if not isinstance(crop, Sequence) or isinstance(crop, str) or len(crop) != 3 or len(set(crop)) != 1:
        raise ValueError(f"invalid model.json: preprocessing.crop_size is {crop!r}, expected a cube [n, n, n]")
    overlap = preprocessing.get("sliding_window_overlap", 0.5)
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ValueError(f"invalid model.json: preprocessing.sliding_window_overlap is {overlap!r}, expected [0, 1)")
    return _ModelFacts(
        task=task,
        architecture=kind,
        backbone=backbone,
        num_classes=num_classes,
        model=model,
        crop_voxels_side=int(_positive_number(crop[0], "preprocessing.crop_size")),
        spacing_mm=_positive_number(spacing[0], "preprocessing.spacing_mm"),
        overlap=float(overlap),
        pretrain_crop=_positive_int(data, "crop_size", "architecture.config.data."),
    )


# ---------------------------------------------------------------------------------------------
# Model weights


def _swin_weight_counts(model: Mapping) -> tuple[int, int]:
    """Return (float32 parameters, int64 buffers) of MONAI's 3D SwinTransformer (patch_norm off)."""
    embed = _positive_int(model, "embed_dim", "model.")
    patch = _positive_int(model, "patch_size", "model.")
    window = _positive_int(model, "window_size", "model.")
    in_channels = _positive_int(model, "in_channels", "model.")
    depths, heads = model.get("depths"), model.get("num_heads")
    if not isinstance(depths, Sequence) or not isinstance(heads, Sequence) or len(depths) != 4 or len(heads) != 4:
        raise ValueError(f"invalid model.json: model.depths {depths!r} and model.num_heads {heads!r} must each list 4 stages")

    parameters = in_channels * embed * patch**3 + embed
    buffers = 0
    for stage, (depth, head_count) in enumerate(zip(depths, heads)):
        width = embed * 2**stage
        # Per block: two LayerNorms, qkv and proj, a 4x MLP and the relative position bias table.
        parameters += depth * (12 * width**2 + 13 * width + (2 * window - 1) ** 3 * head_count)
        buffers += depth * window**6  # relative_position_index, int64
        parameters += 16 * width**2 + 16 * width  # patch merging: LayerNorm(8w) and Linear(8w, 2w) without bias
    return parameters, buffers


def _vit_block_parameters(width: int, mlp_ratio: float) -> int:
    """Return the parameters of one pre-norm transformer block (semantic_attention.Block)."""
    hidden = int(width * mlp_ratio)
    return 4 * width**2 + 2 * width * hidden + 9 * width + hidden


def _semantic_attention_parameters(model: Mapping, pretrain_crop: int) -> int:
    embed = _positive_int(model, "embed_dim", "model.")
    sa_stage = _positive_int(model, "sa_stage", "model.")
    width = embed * 2**sa_stage
    cell = _positive_int(model, "patch_size", "model.") * 2**sa_stage
    grid_cells = (pretrain_crop // cell) ** 3
    depth = _positive_int(model, "sa_depth", "model.")
    ratio = _positive_number(model.get("sa_mlp_ratio"), "model.sa_mlp_ratio")
    return width * grid_cells + width + depth * _vit_block_parameters(width, ratio) + 2 * width


def _vit_backbone_parameters(model: Mapping, pretrain_crop: int) -> int:
    width = _positive_int(model, "vit_width", "model.")
    patch = _positive_int(model, "vit_patch_size", "model.")
    depth = _positive_int(model, "vit_depth", "model.")
    ratio = _positive_number(model.get("vit_mlp_ratio"), "model.vit_mlp_ratio")
    in_channels = _positive_int(model, "in_channels", "model.")
    grid_cells = (pretrain_crop // patch) ** 3
    embedding = in_channels * width * patch**3 + width + width * grid_cells + 2 * width  # + [CLS] and mask token
    return embedding + depth * _vit_block_parameters(width, ratio) + 2 * width


def _residual_block(in_channels: int, out_channels: int) -> int:
    """Return the parameters of MONAI's UnetResBlock (3^3 convolutions without bias, instance norm without affine)."""
    shortcut = in_channels * out_channels if in_channels != out_channels else 0
    return 27 * in_channels * out_channels + 27 * out_channels**2 + shortcut


def _up_block(in_channels: int, out_channels: int) -> int:
    """Return the parameters of MONAI's UnetrUpBlock: a 2^3 transposed convolution, then a residual block on the concatenation."""
    return 8 * in_channels * out_channels + _residual_block(2 * out_channels, out_channels)


def model_weight_bytes(model_description: Mapping) -> int:
    """Return the bytes of the model's state dict, counted from the configuration in model.json.

    The count follows the layers that ``dagman_core.bundle.load_bundle`` builds: float32 parameters
    and buffers, and the int64 relative-position indices of the Swin blocks. It equals the tensor
    bytes of ``model.safetensors``, which adds only a small JSON header.
    """
    facts = _read_model_facts(model_description)
    model = facts.model
    in_channels = _positive_int(model, "in_channels", "model.")
    classes = facts.num_classes

    if facts.architecture == "dagman_swin_unetr":
        feature = _positive_int(model, "embed_dim", "model.")
        parameters, buffers = _swin_weight_counts(model)
        parameters += _semantic_attention_parameters(model, facts.pretrain_crop)
        parameters += _residual_block(in_channels, feature)
        parameters += sum(_residual_block(feature * width, feature * width) for width in (1, 2, 4, 16))
        parameters += _up_block(16 * feature, 8 * feature) + _up_block(8 * feature, 4 * feature)
        parameters += _up_block(4 * feature, 2 * feature) + _up_block(2 * feature, feature) + _up_block(feature, feature)
        parameters += feature * classes + classes
        return FLOAT32_BYTES * parameters + INT64_BYTES * buffers

    if facts.architecture == "dagman_vit_unetr":
        feature = UNETR_FEATURE_SIZE
        hidden = _positive_int(model, "vit_width", "model.")
        parameters = _vit_backbone_parameters(model, facts.pretrain_crop)
        parameters += _residual_block(in_channels, feature)
        # UnetrPrUpBlock: a 2^3 transposed convolution from the tokens, then per layer another one and a residual block.
        for channels, layers in ((2 * feature, 2), (4 * feature, 1), (8 * feature, 0)):
            parameters += 8 * hidden * channels + layers * (8 * channels**2 + _residual_block(channels, channels))
        parameters += _up_block(hidden, 8 * feature) + _up_block(8 * feature, 4 * feature)
        parameters += _up_block(4 * feature, 2 * feature) + _up_block(2 * feature, feature)
        parameters += feature * classes + classes
        return FLOAT32_BYTES * parameters

    # dagman_classifier: the DAGMaN encoder, feature standardisation buffers and one linear layer.
    pooling = model_description["architecture"].get("pooling", "cls")
    if facts.backbone == "vit":
        width = _positive_int(model, "vit_width", "model.")
        parameters, buffers = _vit_backbone_parameters(model, facts.pretrain_crop), 0
    else:
        embed = _positive_int(model, "embed_dim", "model.")
        parameters, buffers = _swin_weight_counts(model)
        parameters += embed + _semantic_attention_parameters(model, facts.pretrain_crop)  # + mask token
        width = embed * 2 ** _positive_int(model, "sa_stage", "model.") if pooling == "cls" else embed * 16
    parameters += width * classes + classes + 2 * width
    return FLOAT32_BYTES * parameters + INT64_BYTES * buffers


# ---------------------------------------------------------------------------------------------
# Stages of the pipeline


@dataclass
class _Stage:
    """Bytes alive at one point of the pipeline, on the host and on the GPU."""

    name: str
    host: dict[str, int] = field(default_factory=dict)
    gpu: dict[str, int] = field(default_factory=dict)


def network_grid_shape(volume_shape_ijk: Sequence[int], spacing_mm_ijk: Sequence[float], spacing_mm: float) -> tuple[int, int, int]:
    """Return the voxel counts (X, Y, Z) of the RAS grid at ``spacing_mm`` that covers the volume.

    The grid spans the physical extent ``(n - 1) * spacing`` of each axis on a lattice of ``spacing_mm``,
    so it has ``ceil(extent / spacing_mm) + 1`` voxels, or one more where the lattice falls unevenly.
    NOTE: an oblique scan gets a grid over its bounding box, which is larger than this axis-aligned count.
    """
    return tuple(math.ceil((size - 1) * spacing / spacing_mm - 1e-6) + 1 for size, spacing in zip(volume_shape_ijk, spacing_mm_ijk))


def _cell_voxels(facts: _ModelFacts) -> int:
    if facts.backbone == "vit":
        return _positive_int(facts.model, "vit_patch_size", "model.")
    return _positive_int(facts.model, "patch_size", "model.") * 2 ** _positive_int(facts.model, "sa_stage", "model.")


def _activation_bytes(facts: _ModelFacts, window_voxels: int, window_batch: int) -> int:
    """Return the activations of one forward pass over ``window_batch`` windows of ``window_voxels`` voxels."""
    model = facts.model
    if facts.architecture == "dagman_swin_unetr":
        width = _positive_int(model, "embed_dim", "model.")
        per_window = SWIN_UNETR_ACTIVATION_FACTOR * window_voxels * width * FLOAT32_BYTES
        return int(UNETR_FIXED_ACTIVATION_BYTES + window_batch * per_window)
    if facts.architecture == "dagman_vit_unetr":
        per_window = VIT_UNETR_ACTIVATION_FACTOR * window_voxels * UNETR_FEATURE_SIZE * FLOAT32_BYTES
        return int(UNETR_FIXED_ACTIVATION_BYTES + window_batch * per_window)
    if facts.backbone == "vit":
        tokens = window_voxels // _positive_int(model, "vit_patch_size", "model.") ** 3
        width = _positive_int(model, "vit_width", "model.")
        return int(window_batch * VIT_TOKEN_ACTIVATION_FACTOR * tokens * width * FLOAT32_BYTES)
    width = _positive_int(model, "embed_dim", "model.")
    return int(window_batch * SWIN_ENCODER_ACTIVATION_FACTOR * window_voxels * width * FLOAT32_BYTES)


def _process_items(cuda: bool) -> dict[str, int]:
    items = {"process baseline (Python, torch, MONAI, SimpleITK)": PROCESS_BASELINE_BYTES}
    if cuda:
        items["CUDA runtime"] = CUDA_HOST_RUNTIME_BYTES
    return items


def _segmentation_stages(
    facts: _ModelFacts, input_voxels: int, input_bytes_per_voxel: int, grid: tuple[int, int, int],
    weights_bytes: int, window_batch: int, cuda: bool,
) -> list[_Stage]:
    """Return the stages of ``segment_image``.

    The body box is taken to be the whole network grid, because its size depends on the voxel values.
    """
    cell = _cell_voxels(facts)
    roi = facts.crop_voxels_side
    classes = facts.num_classes
    grid_voxels = math.prod(grid)
    # pad_for_windows pads the body box to whole attention cells and to at least one window per axis.
    box = [max(roi, -(-size // cell) * cell) for size in grid]
    box_voxels = math.prod(box)
    box_cells = math.prod(size // cell for size in box)
    window_voxels = roi**3
    # MONAI never puts more windows in a pass than the volume has.
    stride = max(int(roi * (1 - facts.overlap)), 1)
    windows = math.prod(math.ceil((size - roi) / stride) + 1 for size in box)
    window_batch = min(window_batch, windows)
    window_io = window_batch * window_voxels * (1 + 2 * classes) + window_voxels  # windows, logits, softmax; weight map

    resident = _process_items(cuda)
    if not cuda:
        resident["model weights"] = weights_bytes
    resident["input volume"] = input_voxels * input_bytes_per_voxel
    resident["resampled volume (network grid, float32)"] = grid_voxels * FLOAT32_BYTES
    windowed = {"HU-windowed volume (float32)": grid_voxels * FLOAT32_BYTES}

    load = _Stage("loading the model", host={**_process_items(cuda), "model weights (model and state dict)": 2 * weights_bytes})
    preprocess = _Stage("preprocessing", host={
        **resident, "HU windowing temporaries (2 x float32)": 2 * grid_voxels * FLOAT32_BYTES,
        **windowed,
    })

    # Everything predict_volume and sliding_window_inference allocate lives on the inference device.
    sliding = {
        "body-box input (float32)": box_voxels * FLOAT32_BYTES,
        f"sliding-window output ({classes} classes, float32)": classes * box_voxels * FLOAT32_BYTES,
        "sliding-window count map (float32)": box_voxels * FLOAT32_BYTES,
        "attention cell sums and counts": 2 * box_cells * FLOAT32_BYTES,
        f"window inputs, outputs and weight map ({window_batch} per pass)": window_io * FLOAT32_BYTES,
        f"window activations ({window_batch} per pass)": _activation_bytes(facts, window_voxels, window_batch),
    }
    infer = _Stage("sliding windows", host={**resident, **windowed})
    if cuda:
        infer.host["body-box input (float32)"] = box_voxels * FLOAT32_BYTES
        infer.gpu = {"CUDA context": CUDA_CONTEXT_BYTES, "model weights": weights_bytes, **sliding}
    else:
        infer.host.update(sliding)

    probabilities = {
        "body-box input (float32)": box_voxels * FLOAT32_BYTES,
        f"body-box probabilities ({classes} classes, float32)": classes * box_voxels * FLOAT32_BYTES,
        f"probabilities on the network grid ({classes} classes)": classes * grid_voxels * FLOAT32_BYTES,
    }
    output = _Stage("output resampling", host={
        **resident, **windowed, **probabilities,
        f"probabilities on the input grid ({classes} classes, float32)": classes * input_voxels * FLOAT32_BYTES,
        # np.argmax over the stacked channels: np.stack, the contiguous copy argmax makes, int64 indices.
        "argmax temporaries on the input grid": input_voxels * (2 * classes * FLOAT32_BYTES + INT64_BYTES),
    })
    if cuda:
        output.gpu = dict(infer.gpu)
    return [load, preprocess, infer, output]


def _classification_stages(
    facts: _ModelFacts, input_voxels: int, input_bytes_per_voxel: int, grid: tuple[int, int, int],
    weights_bytes: int, cuda: bool,
) -> list[_Stage]:
    """Return the stages of ``classify_image`` and ``attention_on_input`` for a crop in "whole" mode."""
    crop = facts.crop_voxels_side
    crop_voxels = crop**3
    grid_voxels = math.prod(grid)
    body_voxels = int(BODY_VOXEL_FRACTION * grid_voxels)

    resident = _process_items(cuda)
    if not cuda:
        resident["model weights"] = weights_bytes
    resident["input volume"] = input_voxels * input_bytes_per_voxel
    resident["resampled volume (network grid, float32)"] = grid_voxels * FLOAT32_BYTES

    load = _Stage("loading the model", host={**_process_items(cuda), "model weights (model and state dict)": 2 * weights_bytes})
    preprocess = _Stage("cutting the crop", host={
        **resident,
        "HU-windowed volume and temporaries (3 x float32)": 3 * grid_voxels * FLOAT32_BYTES,
        "body voxel indices (np.argwhere)": grid_voxels + body_voxels * 6 * INT64_BYTES,
    })

    forward = {"crop (float32)": crop_voxels * FLOAT32_BYTES, "encoder activations": _activation_bytes(facts, crop_voxels, 1)}
    infer = _Stage("classifying the crop", host={**resident})
    if cuda:
        infer.host["crop (float32)"] = crop_voxels * FLOAT32_BYTES
        infer.gpu = {"CUDA context": CUDA_CONTEXT_BYTES, "model weights": weights_bytes, **forward}
    else:
        infer.host.update(forward)

    output = _Stage("attention resampling", host={
        **resident, "attention on the input grid (2 x float32)": 2 * input_voxels * FLOAT32_BYTES,
    })
    if cuda:
        output.gpu = dict(infer.gpu)
    return [load, preprocess, infer, output]


def estimate_peak_memory(
    model_description: Mapping,
    volume_shape_ijk: Sequence[int],
    spacing_mm_ijk: Sequence[float],
    device: str,
    *,
    window_batch: int = 1,
    input_bytes_per_voxel: int = 2,
    weights_bytes: int | None = None,
) -> MemoryEstimate:
    """Estimate the peak memory of ``python -m dagman_core.inference`` on one CT volume.

    Args:
        model_description: the parsed model.json of the bundle.
        volume_shape_ijk: voxel counts (I, J, K) of the input volume, as the volume node's dimensions.
        spacing_mm_ijk: voxel spacing (I, J, K) in mm.
        device: "cpu", "cuda" or "cuda:N". Resolve "auto" first.
        window_batch: sliding windows per forward pass (the child's ``--window-batch``).
        input_bytes_per_voxel: bytes of one input voxel as the child reads it (2 for int16 CT).
        weights_bytes: size of model.safetensors; counted from the configuration when None.

    Returns:
        The estimate. On the CPU everything is host memory. On CUDA the model, the body box, the
        sliding-window accumulators and the activations are GPU memory, and the rest is host memory.

    Raises:
        ValueError: naming the invalid shape, spacing, device, window batch or model.json value.
    """
    shape, spacing = _validate_geometry(volume_shape_ijk, spacing_mm_ijk)
    device = _validate_device(device)
    if isinstance(window_batch, bool) or not isinstance(window_batch, int) or window_batch < 1:
        raise ValueError(f"invalid window batch {window_batch!r}; give the number of windows per pass, at least 1")
    if isinstance(input_bytes_per_voxel, bool) or not isinstance(input_bytes_per_voxel, int) or input_bytes_per_voxel < 1:
        raise ValueError(f"invalid input_bytes_per_voxel {input_bytes_per_voxel!r}; give the bytes of one voxel, e.g. 2 for int16")
    facts = _read_model_facts(model_description)
    if weights_bytes is None:
        weights_bytes = model_weight_bytes(model_description)
    elif isinstance(weights_bytes, bool) or not isinstance(weights_bytes, int) or weights_bytes < 0:
        raise ValueError(f"invalid weights_bytes {weights_bytes!r}; give the size of model.safetensors in bytes")

    cuda = device.startswith("cuda")
    grid = network_grid_shape(shape, spacing, facts.spacing_mm)
    input_voxels = math.prod(shape)
    if facts.task == "segmentation":
        stages = _segmentation_stages(facts, input_voxels, input_bytes_per_voxel, grid, weights_bytes, window_batch, cuda)
    else:
        stages = _classification_stages(facts, input_voxels, input_bytes_per_voxel, grid, weights_bytes, cuda)

    host_peak = max(stages, key=lambda stage: sum(stage.host.values()))
    gpu_peak = max(stages, key=lambda stage: sum(stage.gpu.values()))
    return MemoryEstimate(
        device=device,
        host_bytes=sum(host_peak.host.values()),
        gpu_bytes=sum(gpu_peak.gpu.values()),
        host_breakdown=dict(host_peak.host),
        gpu_breakdown=dict(gpu_peak.gpu),
        host_stage=host_peak.name,
        gpu_stage=gpu_peak.name if cuda else "",
        task=facts.task,
    )


# ---------------------------------------------------------------------------------------------
# Available memory and the warning


def _meminfo_available(path: str = "/proc/meminfo") -> int | None:
    """Return MemAvailable of ``path`` in bytes, or None when the file or the line is missing."""
    try:
        with open(path, encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    parts = line.split()
                    return int(parts[1]) * 1024  # the value is in kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_memory(device: str, free_gpu_bytes: int | None = None) -> int | None:
    """Return the memory in bytes that a run on ``device`` can use now, or None when unknown.

    On the CPU this is the host's available memory: ``psutil.virtual_memory().available`` when
    psutil is installed, else MemAvailable of /proc/meminfo (Linux). On CUDA it is
    ``free_gpu_bytes``, which the caller measures in a child process (for example with
    ``torch.cuda.mem_get_info``), because torch must not be imported into Slicer's process.
    """
    device = _validate_device(device)
    if device.startswith("cuda"):
        return free_gpu_bytes
    try:
        import psutil
    except ImportError:
        return _meminfo_available()
    return int(psutil.virtual_memory().available)


def memory_warning(estimate: MemoryEstimate, available_bytes: int | None, available_host_bytes: int | None = None) -> str:
    """Return a warning for the user when the run may not fit in memory, else "".

    The run fits when ``SAFETY_MARGIN`` times the estimate is at most the available memory.
    ``available_bytes`` is the free memory of the estimate's device (GPU memory for CUDA).
    For CUDA, ``available_host_bytes`` also checks the host RAM. Unknown amounts (None) are not checked.
    """
    messages = []
    if available_bytes is not None and estimate.device_bytes * SAFETY_MARGIN > available_bytes:
        messages.append(_device_message(estimate, available_bytes))
    if estimate.is_cuda and available_host_bytes is not None and estimate.host_bytes * SAFETY_MARGIN > available_host_bytes:
        messages.append(
            f"The run also needs about {format_gib(estimate.host_bytes)} of RAM, and only "
            f"{format_gib(available_host_bytes)} is available. Close other programs before starting it."
        )
    return " ".join(messages)


def _device_message(estimate: MemoryEstimate, available_bytes: int) -> str:
    needed = estimate.device_bytes
    if needed > available_bytes:
        verdict = "will probably not fit"
    else:
        verdict = "may not fit"
    if estimate.is_cuda:
        # Only the sliding windows of a segmentation model retry after running out of memory.
        if estimate.task == "segmentation":
            fallback = ("If it runs out, the inference process retries with one window per pass and then on the CPU, "
                        "which is much slower.")
        else:
            fallback = "If it runs out, the classification fails with an out-of-memory error."
        return (
            f"Inference needs about {format_gib(needed)} of GPU memory on {estimate.device}, and "
            f"{format_gib(available_bytes)} is free, so it {verdict}. {fallback} "
            "Choose the CPU as device, or close other programs that use the GPU."
        )
    return (
        f"Inference needs about {format_gib(needed)} of RAM, and {format_gib(available_bytes)} is "
        f"available, so it {verdict}. The system may slow down or stop the inference process. "
        "Close other programs, or crop the volume to the region of interest first."
    )
