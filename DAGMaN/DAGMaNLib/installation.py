"""First-use installation of the inference process's Python packages into Slicer's Python.

Every installation passes pip a constraints file that pins the installed versions of the
packages that Slicer ships (numpy, SimpleITK, vtk, scipy) and of torch from the PyTorch
extension. pip then stops with a version conflict instead of replacing one of them.

Slicer's installation API, as read in Slicer's source (Base/Python/slicer):

- Slicer 5.11 and later have ``slicer.packaging.pip_install(requirements, constraints=None,
  ..., requester=None)``, which runs ``pip install <requirements> -c <constraints>``.
  ``slicer.util.pip_install(requirements, **kwargs)`` forwards to it.
- Earlier 5.x releases have only ``slicer.util.pip_install(requirements)``, which runs
  ``pip install`` with ``requirements`` split by ``shlex.split`` when it is a ``str`` and
  unchanged when it is a ``list`` (a tuple raises ValueError). The constraints therefore go
  into that list as ``-c <path>``. Older releases split a ``str`` with ``str.split()``
  and fail on a list with AttributeError, so the list is then retried as one string.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
import os
import re
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

from .dependencies import REQUIRED_PACKAGES

logger = logging.getLogger(__name__)

# Distributions that Slicer or its PyTorch extension installed and that pip must keep.
SLICER_PINNED_PACKAGES = ("numpy", "SimpleITK", "vtk", "scipy", "torch")
CONSTRAINTS_FILE_NAME = "dagman-constraints.txt"

# A PEP 508 distribution name at the start of a requirement such as "monai==1.6.1".
REQUIREMENT_NAME_PATTERN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class InstallOutcome:
    """Result of ``install_requirements``.

    ``installed`` lists the requirements passed to pip (pip may have found some already
    satisfied). ``restart_needed`` is True when one of them was imported in this process
    before the installation, so Slicer must restart to load the new version.
    ``installer`` names the Slicer function that ran pip, or is ``None`` when nothing
    had to be installed.
    """

    installed: tuple[str, ...]
    restart_needed: bool
    constraints_path: Path | None
    installer: str | None


def constraints_text(packages: Sequence[str] = SLICER_PINNED_PACKAGES) -> str:
    """Return a pip constraints file with one ``name==version`` line per installed distribution in ``packages``.

    Versions come from ``importlib.metadata`` in this process, which is Slicer's Python
    inside Slicer.
    """
    lines = [
        "# Written by the DAGMaN Slicer module. These packages came with Slicer or its PyTorch extension,",
        "# and the pins make pip stop with a conflict instead of replacing them.",
    ]
    for name in packages:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            # NOTE: a package that Slicer built without pip metadata cannot be pinned here, so pip
            # would install it from the index if a requirement depended on it.
            lines.append(f"# {name}: no installed distribution found, not pinned")
            continue
        lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def write_constraints_file(folder: str | os.PathLike, packages: Sequence[str] = SLICER_PINNED_PACKAGES) -> Path:
    """Write ``constraints_text(packages)`` to ``folder/dagman-constraints.txt`` and return its path.

    The text goes to a temporary file in ``folder`` first and replaces the old file with
    ``os.replace``, so a concurrent pip run never reads a partial file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CONSTRAINTS_FILE_NAME

    handle, temporary = tempfile.mkstemp(prefix=".dagman-constraints-", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as stream:
            stream.write(constraints_text(packages))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def pip_arguments(requirements: Sequence[str], constraints_path: str | os.PathLike) -> list[str]:
    """Return the arguments after ``pip install``: the requirements, then ``-c constraints_path``.

    The result is a ``list`` because ``slicer.util.pip_install`` accepts a list but not
    a tuple, and a list keeps a path with spaces in one argument.
    """
    checked = check_requirements(requirements)
    return [*checked, "-c", str(constraints_path)]


def check_requirements(requirements: Sequence[str], allow_empty: bool = False) -> list[str]:
    """Return ``requirements`` as a list after checking that each one starts with a package name.

    Raises ``TypeError`` for a single string, and ``ValueError`` for an entry that pip would
    read as an option (such as ``--upgrade``) and, unless ``allow_empty``, for an empty list.
    """
    if isinstance(requirements, (str, bytes)):
        raise TypeError(f"requirements must be a list of requirement strings, not the string {requirements!r}")
    checked = [str(requirement).strip() for requirement in requirements]
    if not checked and not allow_empty:
        raise ValueError("requirements is empty; pass at least one requirement such as 'monai==1.6.1'")
    for requirement in checked:
        if not REQUIREMENT_NAME_PATTERN.match(requirement):
            raise ValueError(
                f"requirement {requirement!r} is invalid: it must start with a package name, "
                "as in 'monai==1.6.1' (pip options are not accepted here)"
            )
    return checked


def requirement_name(requirement: str) -> str:
    """Return the distribution name at the start of ``requirement`` (``"pyyaml>=6.0"`` -> ``"pyyaml"``)."""
    match = REQUIREMENT_NAME_PATTERN.match(requirement.strip())
    if match is None:
        raise ValueError(f"requirement {requirement!r} is invalid: it must start with a package name such as 'monai'")
    return match.group(0)


def canonical_name(name: str) -> str:
    """Return the PEP 503 normalized form of a distribution name (``"PyYAML"`` -> ``"pyyaml"``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_requirements(
    requirements: Iterable[str], loaded_modules: Mapping[str, object] = sys.modules
) -> list[str]:
    """Return the requirements whose distribution has a top-level module in ``loaded_modules``.

    A distribution's import names come from the installed metadata
    (``importlib.metadata.packages_distributions``), from ``REQUIRED_PACKAGES`` for ones
    not installed yet, and from the name itself with ``-`` read as ``_``.
    """
    import_names_by_distribution: dict[str, set[str]] = {}
    for import_name, distributions in importlib.metadata.packages_distributions().items():
        for distribution in distributions:
            import_names_by_distribution.setdefault(canonical_name(distribution), set()).add(import_name)
    for import_name, requirement in REQUIRED_PACKAGES.items():
        import_names_by_distribution.setdefault(canonical_name(requirement_name(requirement)), set()).add(import_name)

    imported = []
    for requirement in requirements:
        distribution = canonical_name(requirement_name(requirement))
        import_names = import_names_by_distribution.get(distribution, set()) | {distribution.replace("-", "_")}
        if any(name in loaded_modules for name in import_names):
            imported.append(requirement)
    return imported


def restart_needed(requirements: Iterable[str], loaded_modules: Mapping[str, object] = sys.modules) -> bool:
    """Return whether a package that ``requirements`` installs or upgrades is already imported in this process.

    NOTE: this errs toward a restart. It does not check whether the installed version already
    satisfies the requirement (pip then changes nothing), nor which dependencies pip upgrades.
    """
    return bool(imported_requirements(requirements, loaded_modules))


def install_requirements(
    requirements: Sequence[str],
    slicer_module: types.ModuleType,
    constraints_folder: str | os.PathLike,
    requester: str = "DAGMaN",
) -> InstallOutcome:
    """Install ``requirements`` with Slicer's pip wrapper, always with the pinned constraints file.

    ``slicer_module`` is the ``slicer`` module (a parameter so that tests can pass a fake).
    ``slicer.packaging.pip_install`` is used when it takes a ``constraints`` argument
    (Slicer 5.11 and later), else ``slicer.util.pip_install``. The constraints file is
    written to ``constraints_folder`` first. ``requester`` is the name that Slicer's
    progress dialog shows. Call this from Slicer's main thread, because that dialog is a
    Qt widget. Raises ``subprocess.CalledProcessError`` when pip fails and ``RuntimeError``
    when ``slicer_module`` has neither function.
    """
    requirements = check_requirements(requirements, allow_empty=True)
    if not requirements:
        logger.info("No Python packages to install")
        return InstallOutcome(installed=(), restart_needed=False, constraints_path=None, installer=None)

    imported = imported_requirements(requirements)
    if imported:
        logger.info("Already imported, so Slicer must restart after the installation: %s", imported)
    constraints_path = write_constraints_file(constraints_folder)

    packaging_install = _packaging_pip_install(slicer_module)
    if packaging_install is not None:
        options: dict[str, str] = {"constraints": str(constraints_path)}
        if _accepts_argument(packaging_install, "requester"):
            options["requester"] = requester
        logger.info("Installing %s with slicer.packaging.pip_install, constraints %s", requirements, constraints_path)
        packaging_install(list(requirements), **options)
        installer = "slicer.packaging.pip_install"
    else:
        util_install = getattr(getattr(slicer_module, "util", None), "pip_install", None)
        if util_install is None:
            raise RuntimeError(
                "this Slicer has neither slicer.packaging.pip_install nor slicer.util.pip_install; install the "
                f"packages from a terminal: PythonSlicer -m pip install {' '.join(requirements)} -c {constraints_path}"
            )
        _run_util_pip_install(util_install, pip_arguments(requirements, constraints_path))
        installer = "slicer.util.pip_install"

    # pip ran in another process, so the import system must look at site-packages again.
    importlib.invalidate_caches()
    return InstallOutcome(
        installed=tuple(requirements),
        restart_needed=bool(imported),
        constraints_path=constraints_path,
        installer=installer,
    )


def _run_util_pip_install(util_install: Callable, arguments: list[str]) -> None:
    """Call ``slicer.util.pip_install`` with ``arguments`` as a list, or as one string where it accepts only a string."""
    logger.info("Installing with slicer.util.pip_install: %s", arguments)
    try:
        util_install(arguments)
        return
    except AttributeError as error:
        # A release that splits its argument with str.split() fails on a list before pip starts.
        if "split" not in str(error):
            raise
        logger.info("This slicer.util.pip_install accepts only a string (%s); retrying with one", error)

    if any(re.search(r"\s", argument) for argument in arguments):
        raise RuntimeError(
            f"this Slicer's slicer.util.pip_install splits its argument at spaces, so it cannot pass {arguments}; "
            "choose a constraints folder whose path has no spaces"
        )
    util_install(" ".join(arguments))


def _packaging_pip_install(slicer_module: types.ModuleType) -> Callable | None:
    """Return ``slicer.packaging.pip_install`` when it exists and takes ``constraints``, else ``None``.

    ``slicer.packaging`` is a submodule that ``import slicer`` may not load, so it is
    imported when the attribute is missing. A ``slicer.packaging.pip_install`` without a
    ``constraints`` argument (a uv-based variant in Slicer's development history) is not used.
    """
    packaging = getattr(slicer_module, "packaging", None)
    if packaging is None and isinstance(slicer_module, types.ModuleType):
        try:
            packaging = importlib.import_module(f"{slicer_module.__name__}.packaging")
        except ImportError:
            return None

    pip_install = getattr(packaging, "pip_install", None)
    if pip_install is None or not _accepts_argument(pip_install, "constraints"):
        return None
    return pip_install


def _accepts_argument(function: Callable, name: str) -> bool:
    """Return whether ``function`` has a parameter ``name`` or takes ``**kwargs``."""
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(
        parameter.name == name or parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters
    )
