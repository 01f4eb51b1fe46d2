"""Static checks of the Slicer modules: .ui widget names and classes, CMake file lists, no torch at import."""

from __future__ import annotations

import ast
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Widget name -> class, for every ``self.ui.<name>`` the module's Python uses.
EXPECTED_WIDGETS = {
    "DAGMaN": {
        "inputVolumeSelector": "qMRMLNodeComboBox",
        "modelComboBox": "QComboBox",
        "addModelButton": "QPushButton",
        "modelInfoLabel": "QLabel",
        "deviceComboBox": "QComboBox",
        "deviceInfoLabel": "QLabel",
        "memoryLabel": "QLabel",
        "pointSelector": "qMRMLNodeComboBox",
        "maskSelector": "qMRMLNodeComboBox",
        "keepResultsCheckBox": "QCheckBox",
        "applyButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
        "showAttentionCheckBox": "QCheckBox",
        "attentionOpacitySlider": "ctkSliderWidget",
        "attentionThresholdSlider": "ctkSliderWidget",
        "cacheFolderButton": "ctkDirectoryButton",
        "removeModelButton": "QPushButton",
        "refreshDeviceButton": "QPushButton",
        "inputsCollapsibleButton": "ctkCollapsibleButton",
        "advancedCollapsibleButton": "ctkCollapsibleButton",
    },
    "DAGMaNTrain": {
        "volumesSelector": "qMRMLCheckableNodeComboBox",
        "casesLabel": "QLabel",
        "outputFolderPathLineEdit": "ctkPathLineEdit",
        "validationFractionSpinBox": "QDoubleSpinBox",
        "exportButton": "QPushButton",
        "progressBar": "QProgressBar",
        "statusLabel": "QLabel",
    },
}

# Python packages that each module folder ships, besides the module's own .py file.
MODULE_PACKAGES = {
    "DAGMaN": ("DAGMaNLib", "dagman_core"),
    "DAGMaNTrain": ("DAGMaNTrainLib", "dagman_train"),
}

SLICER_CODE = [
    REPO_ROOT / "DAGMaN" / "DAGMaN.py",
    REPO_ROOT / "DAGMaNTrain" / "DAGMaNTrain.py",
    *sorted((REPO_ROOT / "DAGMaN" / "DAGMaNLib").glob("*.py")),
    *sorted((REPO_ROOT / "DAGMaNTrain" / "DAGMaNTrainLib").glob("*.py")),
]


def used_ui_names(python_path: Path) -> set[str]:
    """Return every ``<name>`` of ``self.ui.<name>`` in ``python_path``."""
    names = set()
    for node in ast.walk(ast.parse(python_path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
        ):
            names.add(node.attr)
    return names


def ui_widgets(ui_path: Path) -> dict[str, str]:
    """Return widget name -> class for every ``<widget>`` of a Qt Designer file."""
    root = ElementTree.parse(ui_path).getroot()
    return {widget.get("name"): widget.get("class") for widget in root.iter("widget")}


def cmake_list(cmake_path: Path, variable: str) -> list[str]:
    """Return the entries of ``set(<variable> ...)`` with ``${MODULE_NAME}`` substituted."""
    text = cmake_path.read_text(encoding="utf-8")
    module_name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text).group(1)
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.DOTALL)
    assert block, f"{cmake_path} has no set({variable} ...)"
    return [entry.replace("${MODULE_NAME}", module_name) for entry in block.group(1).split()]


def module_python_files(module: str) -> set[str]:
    module_dir = REPO_ROOT / module
    files = {f"{module}.py"}
    for package in MODULE_PACKAGES[module]:
        for path in (module_dir / package).rglob("*.py"):
            files.add(path.relative_to(module_dir).as_posix())
    return files


@pytest.mark.parametrize("module", sorted(EXPECTED_WIDGETS))
def test_ui_has_every_used_widget(module):
    used = used_ui_names(REPO_ROOT / module / f"{module}.py")
    widgets = ui_widgets(REPO_ROOT / module / "Resources" / "UI" / f"{module}.ui")

    assert used == set(EXPECTED_WIDGETS[module])
    for name, expected_class in EXPECTED_WIDGETS[module].items():
        assert name in widgets, f"{module}.ui has no widget named {name}"
        assert widgets[name] == expected_class, f"{module}.ui: {name} is a {widgets[name]}, not {expected_class}"


@pytest.mark.parametrize("module", sorted(EXPECTED_WIDGETS))
def test_ui_custom_widgets_declared(module):
    root = ElementTree.parse(REPO_ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()
    declared = {custom.findtext("class") for custom in root.iter("customwidget")}
    widgets = ui_widgets(REPO_ROOT / module / "Resources" / "UI" / f"{module}.ui")

    assert root.findtext("class") == module
    assert widgets[module] == "qMRMLWidget"
    for name, widget_class in widgets.items():
        assert widget_class.startswith("Q") or widget_class in declared, f"{name}: {widget_class} is not declared"
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in widgets
        assert connection.findtext("receiver") in widgets


@pytest.mark.parametrize("module", sorted(MODULE_PACKAGES))
def test_cmake_lists_every_python_file(module):
    listed = cmake_list(REPO_ROOT / module / "CMakeLists.txt", "MODULE_PYTHON_SCRIPTS")

    assert len(listed) == len(set(listed)), f"{module}/CMakeLists.txt lists a file twice"
    missing = sorted(module_python_files(module) - set(listed))
    stale = sorted(set(listed) - module_python_files(module))
    assert missing == [], f"{module}/CMakeLists.txt does not list {missing}"
    assert stale == [], f"{module}/CMakeLists.txt lists files that do not exist: {stale}"


@pytest.mark.parametrize("module", sorted(MODULE_PACKAGES))
def test_cmake_resources_exist(module):
    module_dir = REPO_ROOT / module
    listed = cmake_list(module_dir / "CMakeLists.txt", "MODULE_PYTHON_RESOURCES")

    for entry in listed:
        assert (module_dir / entry).is_file(), f"{module}/CMakeLists.txt lists missing resource {entry}"
    assert f"Resources/UI/{module}.ui" in listed
    assert f"Resources/Icons/{module}.png" in listed
    if module == "DAGMaN":
        presets = {path.relative_to(module_dir).as_posix() for path in (module_dir / "dagman_core" / "presets").glob("*.yaml")}
        assert presets <= set(listed)


@pytest.mark.parametrize("module", sorted(MODULE_PACKAGES))
def test_cmake_registers_module_and_test(module):
    text = (REPO_ROOT / module / "CMakeLists.txt").read_text(encoding="utf-8")

    assert f"set(MODULE_NAME {module})" in text
    assert re.search(r"slicerMacroBuildScriptedModule\(\s*NAME \$\{MODULE_NAME\}.*WITH_GENERIC_TESTS", text, re.DOTALL)
    assert re.search(r"if\(BUILD_TESTING\)\s*.*slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", text, re.DOTALL)


def test_extension_cmake_settings():
    text = (REPO_ROOT / "CMakeLists.txt").read_text(encoding="utf-8")

    for required in (
        "cmake_minimum_required(",
        "project(DAGMaN)",
        'set(EXTENSION_HOMEPAGE "https://github.com/dagman-slicer/SlicerDAGMaN")',
        "set(EXTENSION_CATEGORY ",
        "set(EXTENSION_CONTRIBUTORS ",
        "set(EXTENSION_DESCRIPTION ",
        "set(EXTENSION_ICONURL ",
        "set(EXTENSION_SCREENSHOTURLS ",
        "set(EXTENSION_DEPENDS PyTorch)",
        "find_package(Slicer REQUIRED)",
        "include(${Slicer_USE_FILE})",
        "add_subdirectory(DAGMaN)",
        "add_subdirectory(DAGMaNTrain)",
        "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
        "include(${Slicer_EXTENSION_CPACK})",
    ):
        assert required in text, f"top-level CMakeLists.txt lacks {required}"


@pytest.mark.parametrize(
    "icon", ["Resources/Icons/DAGMaN.png", "DAGMaN/Resources/Icons/DAGMaN.png", "DAGMaNTrain/Resources/Icons/DAGMaNTrain.png"]
)
def test_icons_are_128_pixel_png(icon):
    header = (REPO_ROOT / icon).read_bytes()[:24]

    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", header[16:24]) == (128, 128)


@pytest.mark.parametrize("path", SLICER_CODE, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_no_module_level_torch_import(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    module_level = [node for node in tree.body if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]

    for statement in module_level:
        for node in ast.walk(statement):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top_level = name.split(".")[0]
                assert top_level not in ("torch", "monai", "dagman_core", "dagman_train"), (
                    f"{path.name} imports {name} at module level"
                )


def test_import_loads_no_torch():
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(REPO_ROOT / "DAGMaN")!r}, {str(REPO_ROOT / "DAGMaNTrain")!r}]
        import DAGMaNLib, DAGMaNLib.dependencies, DAGMaNLib.synthetic, DAGMaNTrainLib
        print(sorted(name for name in ("torch", "monai", "dagman_core") if name in sys.modules))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "[]"


STUB_SLICER_CONFIG = """
set(Slicer_USE_FILE "${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
set(Slicer_EXTENSION_CPACK "${CMAKE_CURRENT_LIST_DIR}/Empty.cmake")
"""

# Records each module's scripts and resources, and fails on a file that does not exist.
STUB_USE_SLICER = """
set(BUILD_TESTING ON)
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MODULE "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(file IN LISTS MODULE_SCRIPTS MODULE_RESOURCES)
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${file}")
      message(FATAL_ERROR "${MODULE_NAME}: listed file ${file} does not exist")
    endif()
  endforeach()
  file(WRITE "${CMAKE_BINARY_DIR}/${MODULE_NAME}-scripts.txt" "${MODULE_SCRIPTS}")
  file(WRITE "${CMAKE_BINARY_DIR}/${MODULE_NAME}-generic-tests.txt" "${MODULE_WITH_GENERIC_TESTS}")
endfunction()
function(slicer_add_python_unittest)
  cmake_parse_arguments(TEST "" "SCRIPT" "" ${ARGN})
  file(APPEND "${CMAKE_BINARY_DIR}/unittests.txt" "${TEST_SCRIPT};")
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_extension_configures_with_stub_slicer(tmp_path):
    stub = tmp_path / "stub-slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER_CONFIG)
    (stub / "UseSlicer.cmake").write_text(STUB_USE_SLICER)
    (stub / "Empty.cmake").write_text("")
    build = tmp_path / "build"

    completed = subprocess.run(
        ["cmake", "-S", str(REPO_ROOT), "-B", str(build), f"-DSlicer_DIR={stub}"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stdout + completed.stderr
    for module in MODULE_PACKAGES:
        scripts = set((build / f"{module}-scripts.txt").read_text().split(";"))
        assert scripts == module_python_files(module)
        assert (build / f"{module}-generic-tests.txt").read_text() == "TRUE"
    assert (build / "unittests.txt").read_text() == "DAGMaN.py;DAGMaNTrain.py;"
