"""Tests of the demo data fetch: cache, sha256 checks, pip failure message."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

try:
    from dagman_train import demo_data
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "DAGMaNTrain"))
    from dagman_train import demo_data

SHARED = Path("/work/shared/data/ct/pyradiomics_lung_tumor")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """Point the cache at a temp folder and count pip runs."""
    monkeypatch.setenv("DAGMAN_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real_run = subprocess.run

    def counting_run(command, *args, **kwargs):
        calls.append(list(command))
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(demo_data.subprocess, "run", counting_run)
    return tmp_path / "cache" / "demo-data" / "pyradiomics-3.0.1", calls


def _fetch_or_skip():
    try:
        return demo_data.fetch_demo_data()
    except demo_data.DemoDataDownloadError as exc:
        pytest.skip(f"pip cannot fetch pyradiomics==3.0.1 here: {str(exc).splitlines()[0]}")


def test_cache_folder_rules(tmp_path, monkeypatch):
    monkeypatch.setenv("DAGMAN_CACHE_DIR", str(tmp_path / "c"))
    assert demo_data.demo_data_dir() == tmp_path / "c" / "demo-data" / "pyradiomics-3.0.1"

    monkeypatch.delenv("DAGMAN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    if not sys.platform.startswith("win"):
        assert demo_data.cache_root() == tmp_path / "xdg" / "dagman"


def test_fetch_then_cache_hit(cache):
    folder, calls = cache

    data = _fetch_or_skip()

    assert data.folder == folder
    assert len(calls) == 1
    assert calls[0][1:4] == ["-m", "pip", "download"]
    for path in (data.lung1_image, data.lung1_label, data.lung2_image, data.lung2_label):
        assert path.parent == folder
        assert demo_data.sha256_of(path) == demo_data.FILE_SHA256[path.name]
    assert not list(folder.glob(".*.part"))

    again = demo_data.fetch_demo_data()
    assert again == data
    assert len(calls) == 1


def test_hand_copied_files_skip_pip(cache):
    folder, calls = cache
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent")
    folder.mkdir(parents=True)
    for name in demo_data.FILE_SHA256:
        shutil.copy(SHARED / name, folder / name)

    data = demo_data.fetch_demo_data()

    assert calls == []
    assert data.cases()[1] == (folder / "lung2_image.nrrd", folder / "lung2_label.nrrd")


def test_tampered_file_is_refetched(cache):
    folder, calls = cache
    data = _fetch_or_skip()
    data.lung1_label.write_bytes(b"not the label")
    assert len(calls) == 1

    demo_data.fetch_demo_data()

    assert len(calls) == 2
    assert demo_data.sha256_of(data.lung1_label) == demo_data.FILE_SHA256["lung1_label.nrrd"]


def test_offline_pip_raises_instructions(cache, monkeypatch):
    folder, _ = cache
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null" if sys.platform != "win32" else "nul")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")

    with pytest.raises(demo_data.DemoDataDownloadError) as info:
        demo_data.fetch_demo_data()

    message = str(info.value)
    assert isinstance(info.value, RuntimeError)
    assert "download of the demo data failed" in message.lower()
    assert "No matching distribution" in message or "pyradiomics" in message
    assert "pip download --no-deps --no-binary pyradiomics --no-build-isolation pyradiomics==3.0.1" in message
    assert str(folder) in message
    assert "lung2_label.nrrd" in message


def _tar_with(tmp_path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> Path:
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.addfile(member, io.BytesIO(payload) if payload else None)
    return archive


def test_symlink_member_is_rejected(tmp_path):
    member = tarfile.TarInfo(demo_data.MEMBER_PREFIX + "lung1_label.nrrd")
    member.type = tarfile.SYMTYPE
    member.linkname = "../../../../etc/passwd"
    archive = _tar_with(tmp_path, member)
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(demo_data.DemoDataError, match="not a regular file"):
        demo_data._extract_members(archive, out, ["lung1_label.nrrd"])
    assert list(out.iterdir()) == []


def test_wrong_member_sha256_not_written(tmp_path):
    payload = b"fake nrrd"
    member = tarfile.TarInfo(demo_data.MEMBER_PREFIX + "lung1_label.nrrd")
    member.size = len(payload)
    archive = _tar_with(tmp_path, member, payload)
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(demo_data.DemoDataError, match="sha256"):
        demo_data._extract_members(archive, out, ["lung1_label.nrrd"])
    assert list(out.iterdir()) == []
