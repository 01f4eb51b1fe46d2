"""The chest CT registered with Slicer's Sample Data module."""

from __future__ import annotations

import hashlib

import SimpleITK as sitk

import slicer_fixtures  # noqa: F401 (puts the module folders on sys.path)
from DAGMaNLib.sample_data import FILE_NAME, SHA256, THUMBNAIL, register_sample_data, sample_data_source

# Parameters of SampleData.SampleDataLogic.registerCustomSampleDataSource in Slicer 5.x.
SAMPLE_DATA_PARAMETERS = {
    "category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader", "thumbnailFileName",
    "loadFileType", "loadFiles", "loadFileProperties", "checksums",
}


def test_checksum_matches_the_pyradiomics_scan(ct_data):
    path = ct_data / "pyradiomics_lung_tumor" / FILE_NAME

    assert hashlib.sha256(path.read_bytes()).hexdigest() == SHA256
    assert sitk.ReadImage(str(path)).GetSize() == (512, 512, 61)


def test_registration_arguments():
    source = sample_data_source()

    assert set(source) <= SAMPLE_DATA_PARAMETERS
    assert source["checksums"] == f"SHA256:{SHA256}"
    assert source["uris"].startswith("https://")
    assert source["uris"].endswith(FILE_NAME)
    assert THUMBNAIL.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_register_calls_the_sample_data_logic():
    calls = []

    class RecordingSampleDataLogic:
        """Records registrations; Slicer's SampleData module cannot be imported outside the application."""

        @staticmethod
        def registerCustomSampleDataSource(**keywords):
            calls.append(keywords)

    register_sample_data(RecordingSampleDataLogic)

    assert calls == [sample_data_source()]
