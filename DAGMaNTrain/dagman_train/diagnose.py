"""Attention-head diversity of a pretrained encoder (``dagman diagnose``).

For every attention head of the Swin stages and of the semantic-attention (SA) block, the report gives
the mean attention distance in mm and the attention entropy in nats, measured on centre crops of real
CT. They follow the head-diversity analysis of the "DAGMaN" paper. Heads of one stage that attend over
different ranges give a wide spread of mean distances. A ViT backbone is reported as one stage that
holds all of its blocks.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patheffects import withStroke
from monai.networks.nets.swin_unetr import SwinTransformerBlock, get_window_size, window_partition
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from dagman_core.config import DAGMaNConfig
from dagman_core.data.datalist import load_datalist
from dagman_core.data.transforms import BODY_THRESHOLD, LoadCTd, window_hu
from dagman_core.inference.pipeline import resolve_device
from dagman_core.models.encoder import DAGMaNEncoder, stage_stride
from dagman_core.models.semantic_attention import Attention

from .overlay import ATTENTION_CMAP, ATTENTION_FLOOR
from .pretrain import ENCODER_FILE
from .runs import atomic_write_text, read_run_config, write_atomically

logger = logging.getLogger(__name__)

REPORT_FILE = "head_diversity.json"
PLOT_FILE = "head_diversity.png"
# Equal-width bins from 0 to each stage's maximum token distance, for the histogram of its heads' distances.
HISTOGRAM_BINS = 10
DPI = 120
ATTENTION_ALPHA = 0.55
MARKERS = {"window": "o", "shifted window": "^", "global": "s"}
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")

SHIFT_NOTE = (
    "Swin distances use each token's position in the unshifted grid. A shifted window also holds pairs that "
    "the cyclic shift brings together from opposite borders. MONAI masks them with a -100 logit (not -inf), "
    "and whatever weight they keep counts at their true distance across the grid."
)
PADDING_NOTE = (
    "When a token grid is not a multiple of the window, padding tokens are left out as queries but keep "
    "their attention weight as keys, at their place in the padded grid."
)
GLOBAL_NOTE = (
    "SA and ViT heads are measured for the patch queries. Their distance uses the patch keys only, with "
    "the weights renormalised after dropping the [CLS] key (cls_weight is the dropped weight). Their entropy "
    "uses all 1 + N keys."
)


# --- Measures -----------------------------------------------------------------------------------------


def token_positions_mm(grid: tuple[int, int, int], spacing_mm: float) -> torch.Tensor:
    """Return the token centres (n, 3) in mm of a ``grid`` in (x, y, z) raster order, the first at 0."""
    axes = [torch.arange(size, dtype=torch.float64) * spacing_mm for size in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def pairwise_distances_mm(grid: tuple[int, int, int], spacing_mm: float) -> torch.Tensor:
    """Return the Euclidean distances (n, n) in mm between the token centres of ``grid``."""
    positions = token_positions_mm(grid, spacing_mm)
    return torch.cdist(positions, positions)


def window_positions_mm(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], spacing_mm: float
) -> torch.Tensor:
    """Return the token centres (windows, n, 3) in mm of each window of a MONAI Swin block.

    The block pads the (d, h, w) grid at its far ends to a multiple of the window, rolls it back by
    ``shift`` and splits it into windows, so a shifted window can hold tokens from opposite borders.
    Each centre is the token's place in the padded grid before the roll (padding tokens lie beyond
    the grid).
    """
    padded = [extent + (-extent) % length for extent, length in zip(size, window)]
    positions = token_positions_mm(tuple(padded), spacing_mm).reshape(1, *padded, 3)
    if any(shift):
        positions = torch.roll(positions, shifts=tuple(-offset for offset in shift), dims=(1, 2, 3))
    return window_partition(positions, window)


def max_distance_mm(grid: tuple[int, int, int], spacing_mm: float) -> float:
    """Return the largest distance in mm between two token centres of ``grid``: its diagonal."""
    return spacing_mm * math.sqrt(sum((size - 1) ** 2 for size in grid))


def _mean_over_queries(values: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """Average (W, H, Q) values over windows and the queries kept by ``query_mask`` (W, Q) into (H,)."""
    if query_mask is None:
        return values.mean(dim=(0, 2))
    weights = query_mask[:, None, :].to(values.dtype)
    return (values * weights).sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp_min(1.0)


def mean_attention_distance(
    attention: torch.Tensor, distances_mm: torch.Tensor, query_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Compute each head's mean attention distance in mm.

    Args:
        attention: (W, H, Q, K) attention probabilities of W windows (or batch items), rows summing to 1.
        distances_mm: (Q, K) distances between the query and key token centres, the same in every
            window, or (W, Q, K) per window.
        query_mask: optional (W, Q) bool, False for queries to leave out (padding tokens).

    Returns:
        (H,) float32: sum over keys of weight times distance, averaged over the kept queries of all windows.
    """
    distances = distances_mm.to(device=attention.device, dtype=torch.float32)
    pattern = "whqk,wqk->whq" if distances.dim() == 3 else "whqk,qk->whq"
    per_query = torch.einsum(pattern, attention.float(), distances)
    return _mean_over_queries(per_query, query_mask)


def attention_entropy(attention: torch.Tensor, query_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Compute each head's attention entropy in nats, in [0, ln K].

    Args:
        attention: (W, H, Q, K) attention probabilities.
        query_mask: optional (W, Q) bool, False for queries to leave out.

    Returns:
        (H,) float32: entropy of each query's row over the K keys, averaged over the kept queries.
    """
    per_query = torch.special.entr(attention.float()).sum(dim=-1)
    return _mean_over_queries(per_query, query_mask)


def histogram_entropy(values, edges) -> tuple[list[int], float]:
    """Count ``values`` in the bins of ``edges`` and return (counts, entropy of the counts in nats).

    Values outside the edges are clipped into the first or last bin. The entropy is 0 when all values
    share a bin and ln(bins) when they spread evenly over all bins.
    """
    edges = np.asarray(edges, dtype=np.float64)
    clipped = np.clip(np.asarray(values, dtype=np.float64), edges[0], edges[-1])
    counts, _ = np.histogram(clipped, bins=edges)
    total = counts.sum()
    if total == 0:
        return counts.tolist(), 0.0
    probabilities = counts[counts > 0] / total
    # A single full bin gives -0.0, which adding 0.0 turns into 0.0.
    return counts.tolist(), float(-(probabilities * np.log(probabilities)).sum()) + 0.0


def valid_window_queries(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], batch: int, device=None
) -> torch.Tensor | None:
    """Return (batch * windows, window tokens) bool, False at padding tokens, or None without padding.

    The mask follows MONAI's block: pad the (d, h, w) grid at its far ends up to a multiple of the
    window, roll it back by the shift, then split it into windows (batch-major, as MONAI orders them).
    """
    pads = [(-extent) % length for extent, length in zip(size, window)]
    if not any(pads):
        return None
    valid = torch.ones((1, *size, 1), device=device)
    valid = F.pad(valid, (0, 0, 0, pads[2], 0, pads[1], 0, pads[0]))
    if any(shift):
        valid = torch.roll(valid, shifts=tuple(-offset for offset in shift), dims=(1, 2, 3))
    return window_partition(valid, window).squeeze(-1).bool().repeat(batch, 1)


# --- Hooks ---------------------------------------------------------------------------------------------


@dataclass
class BlockHeads:
    """Per-case measures of one attention block's heads, filled by forward hooks.

    ``grid`` is the window in tokens (Swin) or the whole token grid (SA and ViT), set on the first pass.
    """

    stage: str
    block: int
    kind: str
    num_heads: int
    token_spacing_mm: float
    grid: tuple[int, int, int] | None = None
    shifted: bool = False
    distances_mm: list[torch.Tensor] = field(default_factory=list)
    entropies_nats: list[torch.Tensor] = field(default_factory=list)
    cls_weights: list[torch.Tensor] = field(default_factory=list)

    @property
    def keys(self) -> int:
        """Number of keys of each query: the window tokens, or the N patch tokens plus [CLS]."""
        tokens = math.prod(self.grid)
        return tokens + 1 if self.kind == "global" else tokens


class AttentionProbes:
    """Forward hooks that measure every attention head of a ``DAGMaNEncoder`` on each crop it encodes.

    MONAI's ``WindowAttention`` applies its ``softmax`` submodule to the (B * windows, heads, n, n)
    logits, so a forward hook on that submodule reads the probabilities. A forward pre-hook on the
    enclosing Swin block reads its input grid, from which MONAI's window and shift follow. The SA and
    ViT blocks compute attention with ``scaled_dot_product_attention``, which returns no weights, so a
    hook on their ``Attention`` module recomputes softmax(q k^T / sqrt(d)) from its input and its own
    ``qkv`` layer.

    Use it as a context manager around the forward passes. The hooks are removed on exit. MONAI's
    flash-attention path skips the softmax module, so it is turned off until then.

    Args:
        encoder: the encoder to probe.
        config: the run's configuration (token spacing comes from ``data.spacing_mm``).
        crop_size: side of the cubic crops in voxels (it sets the SA and ViT token grids).
    """

    def __init__(self, encoder: DAGMaNEncoder, config: DAGMaNConfig, crop_size: int):
        self.blocks: list[BlockHeads] = []
        self._attach: list[tuple] = []
        self._handles = []
        self._flash: list[tuple[torch.nn.Module, bool]] = []
        self._distances: dict[tuple, torch.Tensor] = {}
        spacing = config.data.spacing_mm

        if encoder.is_vit:
            backbone = encoder.backbone
            grid = (crop_size // config.model.vit_patch_size,) * 3
            self._add_global("ViT", backbone.blocks, spacing * config.model.vit_patch_size, grid)
            return

        swin = encoder.backbone.swin
        for index, layer in enumerate((swin.layers1, swin.layers2, swin.layers3, swin.layers4)):
            token_spacing = spacing * stage_stride(config, index)
            for number, block in enumerate(layer[0].blocks):
                if not isinstance(block, SwinTransformerBlock):
                    raise ValueError(f"stage {index} block {number} is a {type(block).__name__}, not a Swin attention block")
                heads = BlockHeads(f"stage {index}", number, "window", block.num_heads, token_spacing)
                self.blocks.append(heads)
                self._attach.append(("window", heads, block))

        grid = (crop_size // encoder.cell_voxels,) * 3
        self._add_global("SA", encoder.sa.blocks, spacing * stage_stride(config, encoder.sa_stage), grid)

    def _add_global(self, stage: str, blocks, token_spacing: float, grid: tuple[int, int, int]) -> None:
        for number, block in enumerate(blocks):
            attention = block.attention
            if not isinstance(attention, Attention):
                raise ValueError(f"{stage} block {number} has no recognised attention module")
            heads = BlockHeads(stage, number, "global", attention.num_heads, token_spacing, grid=grid)
            self.blocks.append(heads)
            self._attach.append(("global", heads, attention))

    def __enter__(self) -> AttentionProbes:
        for kind, heads, module in self._attach:
            if kind == "window":
                self._hook_window_block(heads, module)
            else:
                self._handles.append(module.register_forward_hook(self._global_hook(heads)))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attention, enabled in self._flash:
            attention.use_flash_attention = enabled
        self._flash.clear()

    def _hook_window_block(self, heads: BlockHeads, block: SwinTransformerBlock) -> None:
        attention = block.attn
        if not isinstance(getattr(attention, "softmax", None), torch.nn.Module):
            raise RuntimeError(
                f"MONAI's WindowAttention in {heads.stage} has no softmax submodule to hook, so 'dagman diagnose' "
                "cannot read its attention with this MONAI version"
            )
        if getattr(attention, "use_flash_attention", False):
            self._flash.append((attention, True))
            attention.use_flash_attention = False
        geometry = {}

        def before_block(module, args):
            batch, depth, height, width, _ = args[0].shape
            size = (depth, height, width)
            window, shift = get_window_size(size, module.window_size, module.shift_size)
            geometry.update(batch=batch, size=size, window=tuple(window), shift=tuple(shift))

        def after_softmax(module, args, output):
            # NOTE: cross-border pairs of a shifted window count at their true distance. MONAI 1.6 masks them
            # with -100 in compute_mask, not -inf, so they only matter (and may pass the window diagonal) when
            # logits span more than about 100.
            window = geometry["window"]
            heads.grid, heads.shifted = window, any(geometry["shift"])
            query_mask = valid_window_queries(geometry["size"], window, geometry["shift"], geometry["batch"], output.device)
            distances = self._window_distances(geometry["size"], window, geometry["shift"], heads.token_spacing_mm)
            if distances.dim() == 3:
                distances = distances.repeat(geometry["batch"], 1, 1)
            heads.distances_mm.append(mean_attention_distance(output, distances, query_mask).cpu())
            heads.entropies_nats.append(attention_entropy(output, query_mask).cpu())

        self._handles.append(block.register_forward_pre_hook(before_block))
        self._handles.append(attention.softmax.register_forward_hook(after_softmax))

    def _window_distances(self, size, window, shift, spacing_mm: float) -> torch.Tensor:
        """Return the (n, n) distances shared by all unshifted windows, or (windows, n, n) per shifted window."""
        key = (size, window, shift, spacing_mm) if any(shift) else (window, spacing_mm)
        if key not in self._distances:
            if any(shift):
                positions = window_positions_mm(size, window, shift, spacing_mm)
                self._distances[key] = torch.cdist(positions, positions).float()
            else:
                self._distances[key] = pairwise_distances_mm(window, spacing_mm)
        return self._distances[key]

    def _global_hook(self, heads: BlockHeads):
        distances = pairwise_distances_mm(heads.grid, heads.token_spacing_mm)

        def after_attention(module, args, output):
            tokens = args[0]
            batch, length, _ = tokens.shape
            if length != distances.shape[0] + 1:
                raise ValueError(f"{heads.stage} saw {length - 1} patch tokens, expected the {distances.shape[0]} of grid {heads.grid}")
            qkv = module.qkv(tokens).reshape(batch, length, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
            query, key = qkv[0].float(), qkv[1].float()
            probabilities = (query @ key.transpose(-2, -1) * module.head_dim**-0.5).softmax(dim=-1)

            # Rows of the patch queries: (B, H, N, 1 + N), the [CLS] key first.
            patch_rows = probabilities[:, :, 1:]
            cls_weight = patch_rows[..., 0]
            to_patches = patch_rows[..., 1:] / (1.0 - cls_weight).clamp_min(1e-12)[..., None]
            heads.distances_mm.append(mean_attention_distance(to_patches, distances).cpu())
            heads.entropies_nats.append(attention_entropy(patch_rows).cpu())
            heads.cls_weights.append(cls_weight.mean(dim=(0, 2)).cpu())

        return after_attention

    def check_complete(self, passes: int) -> None:
        """Raise RuntimeError unless every block recorded ``passes`` forward passes."""
        for heads in self.blocks:
            if len(heads.distances_mm) != passes:
                raise RuntimeError(
                    f"{heads.stage} block {heads.block} recorded {len(heads.distances_mm)} of {passes} passes, "
                    "so its attention did not go through the hooked modules"
                )


# --- Data and model -----------------------------------------------------------------------------------


def load_pretrained_encoder(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[DAGMaNConfig, DAGMaNEncoder]:
    """Load a pretraining run's configuration and teacher encoder, in eval mode on ``device``.

    Raises:
        FileNotFoundError: the folder has no ``encoder.safetensors`` or no ``config.yaml``.
    """
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    encoder_path = run_dir / ENCODER_FILE
    if not encoder_path.exists():
        raise FileNotFoundError(
            f"no pretrained encoder in {run_dir}: {ENCODER_FILE} is missing. Pass a finished pretraining "
            "run folder, or run 'dagman pretrain' first"
        )
    config = read_run_config(run_dir)

    encoder = DAGMaNEncoder(config, drop_path=0.0)
    encoder.load_state_dict(load_file(str(encoder_path)))
    return config, encoder.to(resolve_device(device)).eval()


def load_center_crop(image_path: str | os.PathLike, config: DAGMaNConfig) -> tuple[torch.Tensor, list[int]]:
    """Load a CT as pretraining does and cut one ``crop_size``^3 crop at the centre of its body box.

    The volume is resampled onto the RAS-aligned grid of ``data.spacing_mm`` and its HU window scaled to
    [0, 1]. The body box bounds the voxels above ``BODY_THRESHOLD``. A volume without any is cropped at
    its centre. The crop is padded with 0 (the window's low end) where it leaves the volume.

    Returns:
        The crop (1, X, Y, Z) in [0, 1], axes pointing to patient right, anterior and superior, and the
        crop centre as a voxel index (I, J, K) of the resampled volume.
    """
    loaded = LoadCTd(keys="image", spacing_mm=config.data.spacing_mm)({"image": str(image_path)})["image"]
    volume = window_hu(loaded.as_tensor()[0], config.data.hu_window)

    body = torch.nonzero(volume > BODY_THRESHOLD)
    if len(body):
        center = ((body.min(dim=0).values + body.max(dim=0).values) // 2).tolist()
    else:
        logger.warning("%s has no voxel above the body threshold, so the crop is taken at the volume centre", image_path)
        center = [extent // 2 for extent in volume.shape]

    size = config.data.crop_size
    crop = torch.zeros((size,) * 3, dtype=torch.float32)
    source, target = [], []
    for extent, middle in zip(volume.shape, center):
        start = middle - size // 2
        low, high = max(start, 0), min(start + size, extent)
        source.append(slice(low, high))
        target.append(slice(low - start, high - start))
    crop[tuple(target)] = volume[tuple(source)]
    return crop[None], [int(value) for value in center]


def case_ids(entries: list[dict]) -> list[str]:
    """Return one file-name-safe id per datalist entry: its image name without suffix, made unique."""
    ids, seen = [], set()
    for entry in entries:
        name = Path(entry["image"]).name
        for suffix in IMAGE_SUFFIXES:
            if name.lower().endswith(suffix):
                name = name[: -len(suffix)]
                break
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"
        candidate, number = base, 2
        while candidate in seen:
            candidate, number = f"{base}_{number}", number + 1
        seen.add(candidate)
        ids.append(candidate)
    return ids


# --- Report -------------------------------------------------------------------------------------------


def _finite(values) -> list[float | None]:
    """Return floats rounded to 6 places, None for NaN or infinity (standard JSON)."""
    return [round(float(value), 6) if math.isfinite(float(value)) else None for value in values]


def summarise_stages(blocks: list[BlockHeads]) -> list[dict]:
    """Group the blocks by stage and average each head's measures over the cases.

    A stage's ``mean_distance_mm`` and ``entropy_nats`` average head h over the stage's blocks, so each
    lists ``num_heads`` values. ``blocks`` keeps every block's own heads. The histogram counts the mean
    distances of all heads of all blocks of the stage. ``max_distance_mm`` is the window diagonal (Swin)
    or the grid diagonal (SA, ViT) between token centres. A value beyond it falls into the last bin.
    """
    stages: dict[str, list[BlockHeads]] = {}
    for heads in blocks:
        stages.setdefault(heads.stage, []).append(heads)

    summaries = []
    for name, members in stages.items():
        first = members[0]
        per_block = []
        for heads in members:
            entry = {
                "block": heads.block,
                "shifted": heads.shifted,
                "mean_distance_mm": _finite(torch.stack(heads.distances_mm).double().mean(dim=0).tolist()),
                "entropy_nats": _finite(torch.stack(heads.entropies_nats).double().mean(dim=0).tolist()),
            }
            if heads.cls_weights:
                entry["cls_weight"] = _finite(torch.stack(heads.cls_weights).double().mean(dim=0).tolist())
            per_block.append(entry)

        distances = np.array([block["mean_distance_mm"] for block in per_block], dtype=np.float64)
        entropies = np.array([block["entropy_nats"] for block in per_block], dtype=np.float64)
        largest = max_distance_mm(first.grid, first.token_spacing_mm)
        edges = np.linspace(0.0, largest if largest > 0 else first.token_spacing_mm, HISTOGRAM_BINS + 1)
        finite_distances = distances[np.isfinite(distances)]
        counts, entropy = histogram_entropy(finite_distances, edges)

        summaries.append({
            "name": name,
            "kind": first.kind,
            "num_heads": first.num_heads,
            "token_spacing_mm": first.token_spacing_mm,
            "grid_tokens": list(first.grid),
            "keys": first.keys,
            "max_distance_mm": round(largest, 6),
            "max_entropy_nats": round(math.log(first.keys), 6),
            "mean_distance_mm": _finite(distances.mean(axis=0)),
            "entropy_nats": _finite(entropies.mean(axis=0)),
            "histogram": {"edges_mm": _finite(edges), "counts": counts, "entropy_nats": round(entropy, 6)},
            "blocks": per_block,
        })
    return summaries


def _write_bytes_atomically(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, then rename it onto ``path``."""
    return write_atomically(path, lambda stream: stream.write(data))


def _save_figure(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return _write_bytes_atomically(path, buffer.getvalue())


def plot_head_diversity(stages: list[dict], title: str, path: Path) -> Path:
    """Draw each head's mean attention distance (left) and entropy (right) per stage into a PNG.

    x is the stage, and the blocks of a stage are spread around it. Markers tell plain windows, shifted
    windows and global attention apart. Grey dashes mark each stage's ``max_distance_mm`` and ln(keys).
    """
    figure = Figure(figsize=(12.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    distance_axis, entropy_axis = figure.subplots(1, 2)
    colors = [ScalarMappable(cmap="viridis").to_rgba(value) for value in np.linspace(0.0, 0.85, len(stages))]

    for position, (stage, color) in enumerate(zip(stages, colors)):
        blocks = stage["blocks"]
        offsets = np.linspace(-0.25, 0.25, len(blocks)) if len(blocks) > 1 else [0.0]
        for offset, block in zip(offsets, blocks):
            if stage["kind"] == "global":
                marker = MARKERS["global"]
            elif block["shifted"]:
                marker = MARKERS["shifted window"]
            else:
                marker = MARKERS["window"]
            for axis, values in ((distance_axis, block["mean_distance_mm"]), (entropy_axis, block["entropy_nats"])):
                finite_values = [value for value in values if value is not None]
                axis.scatter([position + offset] * len(finite_values), finite_values, color=color, marker=marker, s=28, edgecolors="black", linewidths=0.4, zorder=3)
        distance_axis.hlines(stage["max_distance_mm"], position - 0.35, position + 0.35, colors="grey", linestyles="--", linewidth=1)
        entropy_axis.hlines(stage["max_entropy_nats"], position - 0.35, position + 0.35, colors="grey", linestyles="--", linewidth=1)

    for axis, label in ((distance_axis, "mean attention distance (mm)"), (entropy_axis, "attention entropy (nats)")):
        axis.set_xticks(range(len(stages)), [stage["name"] for stage in stages])
        axis.set_xlim(-0.6, len(stages) - 0.4)
        axis.set_ylim(bottom=0.0)
        axis.set_ylabel(label)
        axis.grid(axis="y", alpha=0.3)
    handles = [Line2D([], [], color="black", marker=marker, linestyle="", label=name) for name, marker in MARKERS.items()]
    handles.append(Line2D([], [], color="grey", linestyle="--", label="diagonal / ln(keys)"))
    distance_axis.legend(handles=handles, loc="upper left", fontsize=8)
    figure.suptitle(title)
    return _save_figure(figure, path)


def three_planes(volume: np.ndarray, center: tuple[int, int, int]) -> list[np.ndarray]:
    """Return the axial, coronal and sagittal slices of an (I, J, K) RAS volume through ``center``.

    Rows run from anterior (axial) or superior (coronal, sagittal) at the top. Columns put the patient's
    right on the viewer's left (axial, coronal) and anterior on the left (sagittal, seen from the left).
    """
    i, j, k = center
    return [np.ascontiguousarray(plane.T[::-1, ::-1]) for plane in (volume[:, :, k], volume[:, j, :], volume[i, :, :])]


def plot_case_attention(crop: torch.Tensor, s_att: torch.Tensor, title: str, path: Path) -> Path:
    """Draw three orthogonal slices through the crop centre with S_ATT overlaid into a PNG.

    Args:
        crop: (1, X, Y, Z) CT crop in [0, 1], RAS axes.
        s_att: (g_x, g_y, g_z) S_ATT on the cell grid, upsampled trilinearly to the crop and rescaled
            from its minimum (0) to its maximum (1) over the crop. Values below ``ATTENTION_FLOOR``
            after rescaling are transparent.
        title: figure title.
        path: PNG to write.
    """
    size = tuple(crop.shape[1:])
    heat = F.interpolate(s_att[None, None].float(), size=size, mode="trilinear", align_corners=False)[0, 0]
    heat = ((heat - heat.min()) / (heat.max() - heat.min()).clamp_min(1e-12)).numpy()
    volume = crop[0].numpy()
    center = tuple(extent // 2 for extent in size)

    figure = Figure(figsize=(13.0, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 3)
    norm = Normalize(0.0, 1.0)
    views = (("axial", ("A", "P", "R", "L")), ("coronal", ("S", "I", "R", "L")), ("sagittal", ("S", "I", "A", "P")))
    for axis, ct_plane, heat_plane, (name, letters) in zip(axes, three_planes(volume, center), three_planes(heat, center), views):
        axis.imshow(ct_plane, cmap="gray", vmin=0.0, vmax=1.0, interpolation="bilinear")
        axis.imshow(np.ma.masked_less(heat_plane, ATTENTION_FLOOR), cmap=ATTENTION_CMAP, norm=norm, alpha=ATTENTION_ALPHA, interpolation="bilinear")
        _orientation_letters(axis, letters)
        axis.set_title(name, fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    figure.colorbar(ScalarMappable(norm=norm, cmap=ATTENTION_CMAP), ax=list(axes), shrink=0.85, label="S_ATT (crop minimum to maximum)")
    figure.suptitle(title)
    return _save_figure(figure, path)


def _orientation_letters(axis, letters: tuple[str, str, str, str]) -> None:
    """Write the patient directions at the top, bottom, left and right of a panel."""
    top, bottom, left, right = letters
    style = dict(transform=axis.transAxes, color="yellow", fontsize=9, fontweight="bold", path_effects=[withStroke(linewidth=2.5, foreground="black")])
    axis.text(0.5, 0.98, top, ha="center", va="top", **style)
    axis.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    axis.text(0.02, 0.5, left, ha="left", va="center", **style)
    axis.text(0.98, 0.5, right, ha="right", va="center", **style)


# --- Entry points -------------------------------------------------------------------------------------


def spread_order(count: int, wanted: int) -> list[int]:
    """Return the indices 0..count-1 with ``wanted`` evenly spaced ones first.

    A datalist sorted by class thus gives crops of several classes. The other indices follow in order
    and stand in for volumes that fail to load.
    """
    first = sorted({int(round(value)) for value in np.linspace(0, count - 1, min(wanted, count))}) if count else []
    return first + [index for index in range(count) if index not in set(first)]


def diagnose_run(
    run_dir: str | os.PathLike,
    datalist: str | os.PathLike,
    output_dir: str | os.PathLike,
    cases: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> dict:
    """Measure the attention-head diversity of a pretraining run's encoder on CT crops.

    ``cases`` volumes spread evenly over the datalist's ``training`` list are used (``spread_order``),
    one centre crop each (``load_center_crop``). For each head the mean attention distance (mm) and entropy (nats) are
    averaged over queries, windows and cases. Each stage also gets the entropy (nats) of the histogram of
    its heads' mean distances, over ``HISTOGRAM_BINS`` (10) equal-width bins from 0 to the stage's
    maximum token distance (the window diagonal for Swin, the grid diagonal for SA and ViT).

    Writes into ``output_dir``: ``head_diversity.json`` (the returned report), ``head_diversity.png``
    and ``attention_<case id>.png`` per case (S_ATT over three slices of the crop).

    Args:
        run_dir: pretraining run folder with ``config.yaml`` and ``encoder.safetensors``.
        datalist: datalist JSON whose ``training`` list names the CT volumes.
        output_dir: folder for the report and plots (created when missing).
        cases: at most this many volumes.
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        progress: show a progress bar over the cases on stderr.

    Returns:
        The report written to ``head_diversity.json``.

    Raises:
        FileNotFoundError: the run folder has no encoder or configuration, or the datalist is missing.
        ValueError: ``cases`` is below 1, or none of the volumes could be loaded.
    """
    if cases < 1:
        raise ValueError(f"cases must be at least 1, got {cases}")
    run_dir, output_dir = Path(run_dir), Path(output_dir)
    config, encoder = load_pretrained_encoder(run_dir, device)
    torch_device = next(encoder.parameters()).device
    entries = load_datalist(datalist, "training")
    ids = case_ids(entries)
    output_dir.mkdir(parents=True, exist_ok=True)
    crop_size = config.data.crop_size
    logger.info("diagnosing %s (%s backbone) on up to %d of %d volumes", config.name, config.model.backbone, cases, len(entries))

    # Encode one crop per case with the hooks measuring every head.
    used, skipped, plots = [], [], []
    probes = AttentionProbes(encoder, config, crop_size)
    bar = tqdm(total=min(cases, len(entries)), desc="diagnose", unit="case", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    with logging_redirect_tqdm(), probes, torch.no_grad():
        for index in spread_order(len(entries), cases):
            entry, case_id = entries[index], ids[index]
            if len(used) == cases:
                break
            try:
                crop, center = load_center_crop(entry["image"], config)
            except (OSError, RuntimeError, ValueError) as error:
                logger.warning("skipping %s: %s", entry["image"], error)
                skipped.append({"image": entry["image"], "error": str(error)})
                continue

            output = encoder(crop[None].to(torch_device))
            grid = (crop_size // encoder.cell_voxels,) * 3
            s_att = output["s_att"][0].float().cpu().reshape(grid)
            title = f"{case_id}: S_ATT of {config.name} on a {crop_size}^3 crop at {config.data.spacing_mm:g} mm"
            plots.append(plot_case_attention(crop, s_att, title, output_dir / f"attention_{case_id}.png"))
            used.append({"id": case_id, "image": entry["image"], "crop_center_voxel": center})
            bar.update(1)
    bar.close()
    if not used:
        raise ValueError(f"none of the {len(entries)} volumes in {datalist} could be loaded. The warnings above name the errors")
    probes.check_complete(len(used))

    # Average over the cases and write the report.
    stages = summarise_stages(probes.blocks)
    report = {
        "config": config.name,
        "backbone": config.model.backbone,
        "run": str(run_dir.resolve()),
        "datalist": str(Path(datalist).resolve()),
        "crop_size": crop_size,
        "spacing_mm": config.data.spacing_mm,
        "cases_requested": cases,
        "cases_used": len(used),
        "cases": used,
        "cases_skipped": skipped,
        "histogram_bins": {
            "count": HISTOGRAM_BINS,
            "rule": "equal-width bins from 0 to the stage's max_distance_mm (edges in each stage's histogram)",
        },
        "stages": stages,
        "notes": [SHIFT_NOTE, PADDING_NOTE, GLOBAL_NOTE],
    }
    atomic_write_text(output_dir / REPORT_FILE, json.dumps(report, indent=2, allow_nan=False) + "\n")
    noun = "case" if len(used) == 1 else "cases"
    plot_head_diversity(stages, f"Attention heads of {config.name} ({len(used)} {noun})", output_dir / PLOT_FILE)
    logger.info("wrote %s, %s and %d attention maps to %s", REPORT_FILE, PLOT_FILE, len(plots), output_dir)
    return report


def _diagnose_command(arguments: argparse.Namespace) -> int:
    report = diagnose_run(arguments.run, arguments.datalist, arguments.output, arguments.cases, arguments.device)
    output = Path(arguments.output)
    print(f"head diversity of {report['cases_used']} cases written to {output / REPORT_FILE} and {output / PLOT_FILE}")
    for case in report["cases"]:
        print(f"S_ATT of {case['id']}: {output / ('attention_' + case['id'] + '.png')}")
    return 0


def register(commands) -> argparse.ArgumentParser:
    """Add the ``diagnose`` subcommand to an argparse subparsers object and return its parser."""
    parser = commands.add_parser("diagnose", help="measure the attention-head diversity of a pretrained encoder on CT")
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="pretraining run folder (contains encoder.safetensors)")
    parser.add_argument("--datalist", required=True, metavar="JSON", help="datalist JSON whose 'training' list names the CT volumes")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for head_diversity.json and the PNGs")
    parser.add_argument("--cases", type=int, default=4, metavar="N", help="number of volumes to encode, one centre crop each (default: 4)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    parser.set_defaults(handler=_diagnose_command)
    return parser
