"""``dagman embed``: pooled encoder features per case, cluster distances per class and a UMAP scatter plot.

The DAGMaN paper judges how well a frozen encoder separates organs by the Euclidean distances within
and between the classes' clusters of features. The UMAP plot shows the same clusters.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from dagman_core.bundle import load_bundle
from dagman_core.config import DAGMaNConfig
from dagman_core.metrics import cluster_distances
from dagman_core.models.classification import POOLINGS, DAGMaNClassifier
from dagman_core.models.encoder import DAGMaNEncoder

from .classify import Case, case_id_of, load_cases, load_crops
from .plots import plot_embedding
from .pretrain import ENCODER_FILE
from .runs import atomic_write_text, json_safe, read_run_config

logger = logging.getLogger(__name__)


def load_encoder(model_dir: str | Path | None = None, run_dir: str | Path | None = None) -> tuple[DAGMaNEncoder, DAGMaNConfig, str]:
    """Return the encoder of a model bundle or of a pretraining run, its configuration and a description.

    A classification bundle gives its encoder as fine-tuned, and a segmentation bundle the Swin (or
    ViT) and SA weights of its encoder. A pretraining run gives its EMA teacher's encoder.
    """
    if (model_dir is None) == (run_dir is None):
        raise ValueError("give either --model (a bundle folder) or --run (a pretraining run folder)")
    if run_dir is not None:
        run_dir = Path(run_dir)
        path = run_dir / ENCODER_FILE
        if not path.exists():
            raise FileNotFoundError(f"pretrained encoder not found: {path}; run 'dagman pretrain' first")
        config = read_run_config(run_dir)
        encoder = DAGMaNEncoder(config, drop_path=0.0)
        encoder.load_state_dict(load_file(str(path)))
        return encoder.eval(), config, f"pretraining run {run_dir}"

    model, description = load_bundle(model_dir)
    if isinstance(model, DAGMaNClassifier):
        return model.encoder.eval(), model.config, description["name"]
    encoder = DAGMaNEncoder(model.config, drop_path=0.0)
    state = model.state_dict()
    if model.config.model.backbone == "vit":
        mapped = {f"backbone.{key[len('vit.'):]}": value for key, value in state.items() if key.startswith("vit.")}
    else:
        mapped = {f"backbone.swin.{key[len('unetr.swinViT.'):]}": value for key, value in state.items() if key.startswith("unetr.swinViT.")}
        mapped.update({key: value for key, value in state.items() if key.startswith("sa.")})
    encoder.load_state_dict(mapped)
    return encoder.eval(), model.config, description["name"]


@torch.no_grad()
def case_features(encoder: DAGMaNEncoder, cases: list[Case], pooling: str, device: torch.device) -> np.ndarray:
    """Return the pooled features (N, D) of the cases' crops: the SA [CLS] token or the pooled stage-4 tokens."""
    if pooling not in POOLINGS:
        raise ValueError(f"invalid pooling {pooling!r}; valid choices: {', '.join(POOLINGS)}")
    encoder.to(device)
    features = []
    for case in cases:
        encoded = encoder(case.crop.image[None].to(device))
        features.append((encoded["cls"] if pooling == "cls" else encoded["global_tokens"])[0].float().cpu().numpy())
    return np.stack(features)


def umap_points(features: np.ndarray, seed: int) -> np.ndarray:
    """Project features (N, D) to 2-D with UMAP; fewer than 4 cases fall back to the first two principal axes."""
    if len(features) < 4:
        centred = features - features.mean(axis=0)
        _, _, axes = np.linalg.svd(centred, full_matrices=False)
        points = centred @ axes[:2].T
        return np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
    import umap

    reducer = umap.UMAP(n_neighbors=min(15, len(features) - 1), random_state=seed, init="random", n_jobs=1)
    return reducer.fit_transform(features)


def embed(
    datalist: str | Path,
    output_dir: str | Path,
    model_dir: str | Path | None = None,
    run_dir: str | Path | None = None,
    pooling: str = "cls",
    crop_mode: str = "auto",
    label_field: str = "class",
    labels_csv: str | Path | None = None,
    seed: int = 0,
    device: str = "cpu",
    show_progress: bool = True,
) -> dict:
    """Write pooled features per case, the cluster distances per class and a UMAP plot coloured by class.

    Files in ``output_dir``: ``features.npz`` (``ids``, ``labels``, ``features`` (N, D)),
    ``embedding.csv`` (id, class, UMAP x and y), ``cluster_distances.json`` and ``umap.png``.

    Returns:
        The content of ``cluster_distances.json``.
    """
    output_dir = Path(output_dir)
    encoder, config, source = load_encoder(model_dir, run_dir)
    cases, names = load_cases(datalist, label_field, labels_csv)
    load_crops(cases, config, crop_mode, show_progress)
    features = case_features(encoder, cases, pooling, torch.device(device))
    labels = np.asarray([case.label for case in cases])
    ids = [case_id_of(case.entry) for case in cases]

    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / ".features.npz"
    np.savez_compressed(temporary, ids=np.asarray(ids), labels=labels, features=features)
    temporary.replace(output_dir / "features.npz")

    points = umap_points(features, seed)
    rows = ["id,class,umap_x,umap_y"] + [f"{case_id},{names[label]},{x:.6f},{y:.6f}" for case_id, label, (x, y) in zip(ids, labels, points)]
    atomic_write_text(output_dir / "embedding.csv", "\n".join(rows) + "\n")
    plot_embedding(points, labels, names, output_dir / "umap.png", f"UMAP of {pooling} features: {source}")

    distances = cluster_distances(features, labels)
    report = {
        "source": source,
        "pooling": pooling,
        "feature_width": int(features.shape[1]),
        "cases": int(len(cases)),
        "classes": {str(value): name for value, name in names.items()},
        "distances": _named(distances, names),
    }
    atomic_write_text(output_dir / "cluster_distances.json", json.dumps(json_safe(report), indent=2) + "\n")
    logger.info("wrote features of %d cases to %s", len(cases), output_dir)
    return report


def _named(distances: dict, names: dict[int, str]) -> dict:
    """Key the per-class entries of ``cluster_distances`` by class name; keep the pooled ``intra`` and ``inter``."""
    per_class = {names.get(int(value), str(value)): entry for value, entry in distances["per_class"].items()}
    return {**distances, "per_class": per_class}
