"""The chest CT that Slicer's Sample Data module offers for trying the DAGMaN module.

The scan is "lung2" of the pyradiomics test cases (BSD-3-Clause): a chest CT of 512x512x61
voxels at 0.63x0.63x5.0 mm with a lung tumor of about 48 ml in the left lower lobe. Slicer
downloads it from the pyradiomics release on first use and checks its SHA-256.
"""

from __future__ import annotations

from pathlib import Path

CATEGORY = "DAGMaN"
SAMPLE_NAME = "DAGMaNChestCT"
FILE_NAME = "lung2_image.nrrd"
NODE_NAME = "DAGMaNChestCT"
URL = "https://github.com/Radiomics/pyradiomics/releases/download/v1.0/lung2_image.nrrd"
SHA256 = "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651"
THUMBNAIL = Path(__file__).resolve().parent.parent / "Resources" / "Icons" / "DAGMaNChestCT.png"


def sample_data_source() -> dict:
    """Return the keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the chest CT."""
    return {
        "category": CATEGORY,
        "sampleName": SAMPLE_NAME,
        "uris": URL,
        "fileNames": FILE_NAME,
        "nodeNames": NODE_NAME,
        "thumbnailFileName": str(THUMBNAIL),
        "loadFileType": "VolumeFile",
        "checksums": f"SHA256:{SHA256}",
    }


def register_sample_data(sample_data_logic) -> None:
    """Register the chest CT with Slicer's Sample Data module (``SampleData.SampleDataLogic``)."""
    sample_data_logic.registerCustomSampleDataSource(**sample_data_source())
