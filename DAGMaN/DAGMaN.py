"""DAGMaN Slicer module: segmentation and attention map of a CT volume with a DAGMaN model.

The widget only collects inputs and shows progress; every decision is in the Qt-free
``DAGMaNLib`` package, which the pytest suite tests against slicer-core. torch is never
imported in Slicer's process at start-up: inference runs in a ``PythonSlicer`` child process.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DAGMaNLib import DAGMaNLogic, InferenceCancelled, InferenceError
from DAGMaNLib.catalog import SELECTED_MODEL_KEY, CatalogueError, ModelCatalog
from DAGMaNLib.command import find_python_executable
from DAGMaNLib.dependencies import TORCH_VERSION_REQUIREMENT, missing_requirements, torch_installed
from DAGMaNLib.environment import describe_environment, detect_nvidia_gpus, device_choices, probe_torch
from DAGMaNLib.installation import install_requirements
from DAGMaNLib.sample_data import register_sample_data
from DAGMaNLib.state import PanelState, PanelStateMachine

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100
WARNING_STYLE = "color: #c0392b"

__all__ = ["DAGMaN", "DAGMaNLogic", "DAGMaNTest", "DAGMaNWidget"]


class DAGMaN(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DAGMaN"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DAGMaN for 3D Slicer contributors"]
        self.parent.helpText = (
            "Segments or classifies a CT volume with a DAGMaN model (a Swin transformer pretrained by "
            "co-distillation with attention-guided masking) and shows the model's semantic-attention map "
            "over the CT. Choose the CT volume and a model, then click Apply. "
            "See <a href='https://github.com/dagman-slicer/SlicerDAGMaN'>the extension's documentation</a>."
        )
        self.parent.acknowledgementText = (
            "DAGMaN for 3D Slicer is open-source software under the Apache-2.0 licence. The sample chest CT "
            "is a pyradiomics test case (BSD-3-Clause)."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the chest CT with a lung tumor to the Sample Data module."""
    import SampleData

    register_sample_data(SampleData.SampleDataLogic)


class DAGMaNWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel with the CT volume, model, device, Apply/Cancel button, progress and attention display.

    NOTE: the pytest suite checks this class only statically, by its widget names against the
    .ui file, because Qt and the Slicer application are not available there. Its decisions
    live in DAGMaNLib (logic, catalog, state, environment), which the suite runs.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.catalog = None
        self.panel = PanelStateMachine()
        self.job = None
        self.attentionNode = None
        self.pollTimer = None
        self.probeTimer = None
        self.probeResult = None
        self.probe = None
        self.startTime = 0.0

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DAGMaN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DAGMaNLogic()
        self.catalog = ModelCatalog(slicer.app.userSettings(), Path(slicer.app.cachePath) / "DAGMaN" / "models")
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)
        self.probeTimer = qt.QTimer()
        self.probeTimer.setInterval(POLL_INTERVAL_MS)
        self.probeTimer.connect("timeout()", self.onProbeTimer)

        self.ui.cacheFolderButton.directory = str(self.catalog.cache_folder)
        self.updateModelList(slicer.app.userSettings().value(SELECTED_MODEL_KEY, ""))

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputsChanged)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onInputsChanged)
        self.ui.addModelButton.connect("clicked(bool)", self.onAddModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.refreshDeviceButton.connect("clicked(bool)", self.startDeviceProbe)
        self.ui.cacheFolderButton.connect("directoryChanged(QString)", self.onCacheFolderChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showAttentionCheckBox.connect("toggled(bool)", self.onShowAttentionToggled)
        self.ui.attentionOpacitySlider.connect("valueChanged(double)", self.onAttentionOpacityChanged)
        self.ui.attentionThresholdSlider.connect("valueChanged(double)", self.onAttentionThresholdChanged)
        self.ui.keepResultsCheckBox.connect("toggled(bool)", self.onKeepResultsToggled)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

        self.onModelChanged()
        self.startDeviceProbe()

    def cleanup(self):
        self.abandonRunningJob()
        if self.probeTimer is not None:
            self.probeTimer.stop()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        self.abandonRunningJob()
        self.attentionNode = None

    # Models and device

    def selectedModelId(self):
        return self.ui.modelComboBox.currentData or ""

    def updateModelList(self, selectId=""):
        wasBlocked = self.ui.modelComboBox.blockSignals(True)
        self.ui.modelComboBox.clear()
        for entry in self.catalog.entries():
            self.ui.modelComboBox.addItem(entry.display_name(), entry.id)
        index = self.ui.modelComboBox.findData(selectId) if selectId else -1
        self.ui.modelComboBox.currentIndex = index if index >= 0 else 0
        self.ui.modelComboBox.blockSignals(wasBlocked)

    def onModelChanged(self, *_):
        modelId = self.selectedModelId()
        self.ui.modelInfoLabel.text = ""
        self.ui.removeModelButton.enabled = False
        classifier = False
        if modelId:
            slicer.app.userSettings().setValue(SELECTED_MODEL_KEY, modelId)
            entry = self.catalog.entry(modelId)
            self.ui.modelInfoLabel.text = entry.describe()
            self.ui.removeModelButton.enabled = entry.source == "user" or entry.installed
            classifier = entry.task == "classification"
        # A lesion point or mask only places a classifier's crop; the logic ignores them otherwise.
        self.ui.pointSelector.enabled = classifier
        self.ui.maskSelector.enabled = classifier
        self.onInputsChanged()

    def onAddModel(self):
        folder = qt.QFileDialog.getExistingDirectory(
            self.parent, "Choose a DAGMaN model bundle folder (with model.json)"
        )
        if not folder:
            return
        try:
            with slicer.util.WaitCursor():
                entry = self.catalog.add_folder(folder, progress=self.showStatus)
        except (CatalogueError, OSError) as error:
            slicer.util.errorDisplay(f"The model could not be added: {error}")
            return
        self.updateModelList(entry.id)
        self.onModelChanged()
        self.showStatus(f"Added {entry.title}")

    def onRemoveModel(self):
        modelId = self.selectedModelId()
        if not modelId or not slicer.util.confirmOkCancelDisplay(
            f"Delete the model {self.ui.modelComboBox.currentText!r} from {self.catalog.cache_folder}?"
        ):
            return
        self.catalog.remove(modelId)
        self.updateModelList()
        self.onModelChanged()

    def onCacheFolderChanged(self, path):
        if not path or Path(path) == self.catalog.cache_folder:
            return
        try:
            self.catalog.set_cache_folder(path)
        except CatalogueError as error:
            slicer.util.errorDisplay(str(error))
            self.ui.cacheFolderButton.directory = str(self.catalog.cache_folder)
            return
        self.updateModelList(self.selectedModelId())
        self.onModelChanged()

    def startDeviceProbe(self):
        """Probe torch and the GPUs in a new Python process, on a thread so that the panel stays responsive."""
        if self.probeTimer.isActive():
            return
        self.ui.deviceInfoLabel.text = "Checking PyTorch in a new Python process..."
        self.ui.deviceInfoLabel.styleSheet = ""
        self.probeResult = None

        def probe():
            try:
                self.probeResult = (probe_torch(find_python_executable()), detect_nvidia_gpus())
            except Exception as error:  # onProbeTimer shows it in the panel
                self.probeResult = error

        threading.Thread(target=probe, name="DAGMaN device probe", daemon=True).start()
        self.probeTimer.start()

    def onProbeTimer(self):
        if self.probeResult is None:
            return
        self.probeTimer.stop()
        if isinstance(self.probeResult, Exception):
            self.ui.deviceInfoLabel.text = f"Could not check PyTorch: {self.probeResult}"
            self.ui.deviceInfoLabel.styleSheet = WARNING_STYLE
            return
        self.probe, gpus = self.probeResult
        report = describe_environment(self.probe, gpus)
        self.ui.deviceInfoLabel.text = "\n".join(report.lines + ((report.warning,) if report.warning else ()))
        self.ui.deviceInfoLabel.styleSheet = WARNING_STYLE if report.warning else ""

        current = self.ui.deviceComboBox.currentText
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.clear()
        for choice in device_choices(self.probe):
            self.ui.deviceComboBox.addItem(choice)
        index = self.ui.deviceComboBox.findText(current)
        self.ui.deviceComboBox.currentIndex = max(index, 0)
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        self.onInputsChanged()

    # Inputs, memory estimate and the Apply button

    def inputsReady(self):
        if self.ui.inputVolumeSelector.currentNode() is None or not self.selectedModelId():
            return False
        return self.catalog.entry(self.selectedModelId()).installed

    def onInputsChanged(self, *_):
        self.updateControls()
        self.updateMemoryEstimate()

    def updateMemoryEstimate(self):
        self.ui.memoryLabel.text = ""
        self.ui.memoryLabel.styleSheet = ""
        if not self.inputsReady():
            return
        entry = self.catalog.entry(self.selectedModelId())
        text, warning = self.logic.memory_report(
            self.ui.inputVolumeSelector.currentNode(), entry.folder, self.ui.deviceComboBox.currentText, self.probe
        )
        self.ui.memoryLabel.text = "\n".join(line for line in (text, warning) if line)
        self.ui.memoryLabel.styleSheet = WARNING_STYLE if warning else ""

    def updateControls(self):
        controls = self.panel.controls(self.inputsReady())
        self.ui.applyButton.text = controls.apply_text
        self.ui.applyButton.enabled = controls.apply_enabled
        self.ui.inputsCollapsibleButton.enabled = controls.inputs_enabled
        self.ui.advancedCollapsibleButton.enabled = controls.inputs_enabled
        if self.panel.message:
            self.ui.statusLabel.text = self.panel.message

    def moveTo(self, state, message=""):
        self.panel.to(state, message)
        self.updateControls()

    def showStatus(self, message):
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def onApplyButton(self):
        if self.panel.state is PanelState.RUNNING:
            self.moveTo(PanelState.CANCELLING, "Cancelling...")
            self.cancelRunningJob()
            return
        if not self.ensureDependencies():
            return

        volumeNode = self.ui.inputVolumeSelector.currentNode()
        try:
            with slicer.util.WaitCursor():
                self.showStatus("Checking the model's checksum")
                modelFolder = self.catalog.verified_folder(self.selectedModelId())
        except (CatalogueError, OSError) as error:
            self.moveTo(PanelState.FAILED, "Failed")
            slicer.util.errorDisplay(str(error))
            return
        _, memoryWarning = self.logic.memory_report(
            volumeNode, modelFolder, self.ui.deviceComboBox.currentText, self.probe
        )
        if memoryWarning and not slicer.util.confirmOkCancelDisplay(f"{memoryWarning}\n\nRun anyway?"):
            self.showStatus("Not started")
            return

        self.ui.progressBar.value = 0
        try:
            self.job = self.logic.start(
                volumeNode,
                modelFolder,
                self.ui.deviceComboBox.currentText,
                progress_callback=self.onProgress,
                point_node=self.ui.pointSelector.currentNode(),
                mask_node=self.ui.maskSelector.currentNode(),
            )
        except (ValueError, InferenceError, OSError) as error:
            self.moveTo(PanelState.FAILED, "Failed")
            slicer.util.errorDisplay(str(error))
            return
        self.startTime = time.monotonic()
        self.moveTo(PanelState.RUNNING, "Starting the inference process")
        self.pollTimer.start()

    def onPollTimer(self):
        if self.job is None or not self.job.poll():
            return
        self.pollTimer.stop()
        job, self.job = self.job, None
        try:
            with slicer.util.WaitCursor():
                outputs = self.logic.finish(job)
        except InferenceCancelled:
            self.ui.progressBar.value = 0
            self.moveTo(PanelState.IDLE, "Cancelled")
        except InferenceError as error:
            self.moveTo(PanelState.FAILED, "Failed")
            slicer.util.errorDisplay(str(error))
        except Exception as error:
            # Any other error must still free the panel, or its inputs would stay locked.
            logger.exception("Loading the DAGMaN results failed")
            self.moveTo(PanelState.FAILED, "Failed")
            slicer.util.errorDisplay(f"Loading the results failed: {error}")
        else:
            self.attentionNode = outputs.attention_node
            self.logic.set_attention_opacity(self.ui.attentionOpacitySlider.value, self.attentionNode)
            self.logic.set_attention_visible(self.ui.showAttentionCheckBox.checked, self.attentionNode)
            elapsed = time.monotonic() - self.startTime
            self.moveTo(PanelState.DONE, f"Done in {elapsed:.1f} s: {outputs.summary}")

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        if self.panel.state is PanelState.RUNNING:
            self.ui.statusLabel.text = message

    # Display

    def attentionShown(self):
        return self.attentionNode is not None and self.attentionNode.GetScene() is not None

    def onKeepResultsToggled(self, checked):
        self.logic.keep_previous_results = checked

    def onShowAttentionToggled(self, checked):
        if self.attentionShown():
            self.logic.set_attention_visible(checked, self.attentionNode)

    def onAttentionOpacityChanged(self, value):
        if self.attentionShown():
            self.logic.set_attention_opacity(value, self.attentionNode)

    def onAttentionThresholdChanged(self, value):
        self.logic.attention_threshold = value
        if self.attentionShown():
            self.logic.set_attention_threshold(value, self.attentionNode)

    def cancelRunningJob(self):
        if self.job is not None:
            self.logic.cancel()

    def abandonRunningJob(self):
        """Stop a running child and delete its files without loading results (module or scene closing)."""
        if self.pollTimer is not None:
            self.pollTimer.stop()
        if self.job is None:
            return
        self.job = None
        self.logic.abandon()
        if self.panel.state is PanelState.RUNNING:
            self.panel.to(PanelState.CANCELLING)
        self.moveTo(PanelState.IDLE, "Cancelled")

    # First-use setup

    def ensureDependencies(self):
        """Install torch (through the PyTorch extension) and the missing pip packages; return whether all are there."""
        missing = missing_requirements()
        needsTorch = not torch_installed()
        if not missing and not needsTorch:
            return True

        packages = (["torch"] if needsTorch else []) + missing
        if not slicer.util.confirmOkCancelDisplay(
            "DAGMaN needs these Python packages, which are not installed yet:\n\n"
            + "\n".join(packages)
            + "\n\nInstall them now? This can take several minutes. Slicer's own numpy, SimpleITK and VTK are kept."
        ):
            return False

        self.moveTo(PanelState.INSTALLING, "Installing Python packages...")
        slicer.app.processEvents()
        try:
            with slicer.util.WaitCursor():
                if needsTorch:
                    self.installTorch()
                outcome = install_requirements(missing, slicer, Path(slicer.app.temporaryPath) / "DAGMaN")
                self.showStatus("Checking that PyTorch imports in a new Python process")
                probe = probe_torch(find_python_executable())
        except Exception as error:
            logger.exception("Installing %s failed", ", ".join(packages))
            self.moveTo(PanelState.FAILED, "Installation failed")
            slicer.util.errorDisplay(f"Installing {', '.join(packages)} failed: {error}")
            return False

        if not probe.ready:
            problem = probe.probe_error or probe.import_error or "; ".join(probe.failed_imports.values())
            self.moveTo(PanelState.FAILED, "Installation failed")
            slicer.util.errorDisplay(f"The packages were installed, but a new Python process cannot import them: {problem}")
            return False

        self.moveTo(PanelState.IDLE, "Python packages installed")
        self.startDeviceProbe()
        if outcome.restart_needed and slicer.util.confirmYesNoDisplay(
            "Slicer had already loaded an older version of an installed package. Restart Slicer now to use the new one?"
        ):
            slicer.util.restart()
        return True

    def installTorch(self):
        try:
            import PyTorchUtils
        except ImportError as error:
            raise RuntimeError("the PyTorch extension is missing; install it from the Extensions Manager") from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT) is None:
            raise RuntimeError("PyTorch could not be installed; see the Python console for details")


class DAGMaNTest(ScriptedLoadableModuleTest):
    """Runs the real inference child process with random tiny models on a synthetic CT volume.

    Each model goes through the catalogue (copied into a temporary cache folder and verified
    by checksum) before it runs, as a model chosen in the panel does.
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DAGMaN_random_tiny_bundle()
        self.setUp()
        self.test_DAGMaN_random_tiny_classifier()

    def runTinyModel(self, task):
        import tempfile

        from dagman_core.bundle import write_random_bundle
        from DAGMaNLib.catalog import MemorySettings
        from DAGMaNLib.synthetic import add_synthetic_ct_volume

        self.delayDisplay(f"Writing a random tiny {task} model and a synthetic CT")
        volumeNode = add_synthetic_ct_volume(slicer.mrmlScene, shape_kji=(20, 40, 44), spacing_mm=(1.6, 1.5, 3.0))
        with tempfile.TemporaryDirectory() as tempDir:
            bundle = write_random_bundle(Path(tempDir) / "download", preset="tiny_cpu", seed=0, task=task)
            catalog = ModelCatalog(MemorySettings(), Path(tempDir) / "cache")
            entry = catalog.add_folder(bundle)

            self.delayDisplay("Running DAGMaN inference in a child process")
            outputs = DAGMaNLogic().run(volumeNode, catalog.verified_folder(entry.id), device="cpu", timeout_s=900)
        return volumeNode, outputs

    def assertAttentionOnInputGrid(self, volumeNode, attentionNode):
        import numpy as np
        import vtk

        inputMatrix = vtk.vtkMatrix4x4()
        attentionMatrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(inputMatrix)
        attentionNode.GetIJKToRASMatrix(attentionMatrix)
        self.assertTrue(
            np.allclose(
                slicer.util.arrayFromVTKMatrix(inputMatrix), slicer.util.arrayFromVTKMatrix(attentionMatrix), atol=1e-4
            )
        )
        attention = slicer.util.arrayFromVolume(attentionNode)
        self.assertEqual(attention.dtype, np.float32)
        self.assertGreaterEqual(float(attention.min()), 0.0)
        self.assertLessEqual(float(attention.max()), 1.0)
        self.assertEqual(attentionNode.GetAttribute("DAGMaN.Layer"), "attention")

    def test_DAGMaN_random_tiny_bundle(self):
        volumeNode, outputs = self.runTinyModel("segmentation")

        segmentation = outputs.segmentation_node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(outputs.result.labels))
        for label in outputs.result.labels:
            self.assertNotEqual(segmentation.GetSegmentIdBySegmentName(label.name), "")
        self.assertAttentionOnInputGrid(volumeNode, outputs.attention_node)
        self.assertEqual(outputs.segmentation_node.GetAttribute("DAGMaN.ModelSHA256"), outputs.result.model_sha256)
        self.delayDisplay("Segmentation test passed")

    def test_DAGMaN_random_tiny_classifier(self):
        volumeNode, outputs = self.runTinyModel("classification")

        self.assertIsNone(outputs.segmentation_node)
        table = outputs.table_node.GetTable()
        self.assertEqual(table.GetNumberOfRows(), 2)
        probabilities = [table.GetValue(row, 2).ToDouble() for row in range(2)]
        self.assertAlmostEqual(sum(probabilities), 1.0, places=4)
        self.assertIn(outputs.table_node.GetAttribute("DAGMaN.PredictedClass"), ("benign", "malignant"))
        self.assertAttentionOnInputGrid(volumeNode, outputs.attention_node)
        self.delayDisplay("Classification test passed")
