"""MONAI dictionary transforms for pretraining and fine-tuning on CT."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CopyItemsd,
    CropForegroundd,
    MapTransform,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ScaleIntensityRanged,
    SelectItemsd,
    SpatialPadd,
)

from ..config import DAGMaNConfig
from .geometry import image_to_tensor_ijk, ras_affine, resample_to_ras
from .io import read_image

# Body voxels after HU scaling: above -500 HU with the default [-1000, 1000] HU window.
BODY_THRESHOLD = 0.25


class LoadCTd(MapTransform):
    """Read each key's volume and resample it onto the RAS-aligned isotropic grid.

    Produces MONAI ``MetaTensor`` values of shape (1, I, J, K) with their IJK-to-RAS affine; keys named in
    ``label_keys`` use nearest-neighbour interpolation and become uint8.
    """

    def __init__(self, keys, spacing_mm: float, label_keys=("label",), allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spacing_mm = spacing_mm
        self.label_keys = set(label_keys)

    def __call__(self, data):
        data = dict(data)
        for key in self.key_iterator(data):
            source = data[key]
            is_label = key in self.label_keys
            resampled = resample_to_ras(read_image(source), self.spacing_mm, is_label=is_label)
            tensor = image_to_tensor_ijk(resampled)
            if is_label:
                tensor = tensor.to(torch.uint8)
            data[key] = MetaTensor(tensor, affine=torch.as_tensor(ras_affine(resampled)), meta={"filename_or_obj": str(source)})
        return data


def _intensity_and_crop(config: DAGMaNConfig, keys: list[str], crop_size: int) -> list:
    low, high = config.data.hu_window
    return [
        ScaleIntensityRanged(keys="image", a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", select_fn=lambda x: x > BODY_THRESHOLD, margin=4, allow_smaller=True),
        SpatialPadd(keys=keys, spatial_size=(crop_size,) * 3),
    ]


def pretraining_transforms(config: DAGMaNConfig) -> tuple[Compose, Compose]:
    """Return (deterministic, random) transforms that turn ``{"image": path}`` into two views.

    The deterministic part (load, resample, window, foreground crop) is what a cache stores. The random
    part yields ``view_u`` and ``view_v``: independent random crops of ``crop_size``^3 voxels with random
    flips and a small intensity scale and shift each.
    """
    crop = config.data.crop_size
    deterministic = Compose([LoadCTd(keys="image", spacing_mm=config.data.spacing_mm), *_intensity_and_crop(config, ["image"], crop)])

    random_steps = [CopyItemsd(keys="image", times=2, names=["view_u", "view_v"])]
    for view in ("view_u", "view_v"):
        random_steps += [
            RandSpatialCropd(keys=view, roi_size=(crop,) * 3, random_size=False),
            RandFlipd(keys=view, prob=0.5, spatial_axis=0),
            RandFlipd(keys=view, prob=0.5, spatial_axis=1),
            RandFlipd(keys=view, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys=view, factors=0.1, prob=0.5),
            RandShiftIntensityd(keys=view, offsets=0.1, prob=0.5),
        ]
    # The whole volume stays in the cache; only the two crops go into the batch.
    random_steps.append(SelectItemsd(keys=["view_u", "view_v"]))
    return deterministic, Compose(random_steps)


def segmentation_transforms(config: DAGMaNConfig, samples_per_volume: int = 2) -> tuple[Compose, Compose]:
    """Return (deterministic, random) transforms for segmentation fine-tuning on ``{"image", "label"}``.

    A fraction ``finetune.positive_fraction`` of the random crops is centred on label voxels, the rest
    on background voxels.
    """
    positive = config.finetune.positive_fraction
    crop = config.finetune.crop_size
    keys = ["image", "label"]
    deterministic = Compose([LoadCTd(keys=keys, spacing_mm=config.data.spacing_mm), *_intensity_and_crop(config, keys, crop)])
    random = Compose(
        [
            RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=(crop,) * 3, pos=positive, neg=1.0 - positive, num_samples=samples_per_volume
            ),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )
    return deterministic, random


def window_hu(array: np.ndarray | torch.Tensor, hu_window: tuple[float, float]):
    """Clip HU values to ``hu_window`` and scale them to [0, 1]."""
    low, high = hu_window
    if isinstance(array, torch.Tensor):
        return ((array.clamp(low, high) - low) / (high - low)).float()
    return ((np.clip(array, low, high) - low) / (high - low)).astype(np.float32)
