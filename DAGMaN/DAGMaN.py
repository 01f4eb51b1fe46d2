"""DAGMaN Slicer module: segmentation and attention map of a CT volume with a DAGMaN model.

The widget only collects inputs and shows progress; every decision is in the Qt-free
``DAGMaNLib`` package, which the pytest suite tests against slicer-core. torch is never
imported in Slicer's process at start-up: inference runs in a ``PythonSlicer`` child process.
"""

from __future__ import annotations

import logging
import time

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DAGMaNLib import DAGMaNLogic, InferenceCancelled, InferenceError
from DAGMaNLib.dependencies import TORCH_VERSION_REQUIREMENT, missing_requirements, torch_installed

logger = logging.getLogger(__name__)

POLL_INTERVAL_MS = 100

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
            "Segments a CT volume with a DAGMaN model (a Swin transformer pretrained by co-distillation "
            "with attention-guided masking) and shows the model's semantic-attention map over the CT. "
            "Choose the CT volume and the folder of a model bundle, then click Apply. "
            "See <a href='https://github.com/dagman-slicer/SlicerDAGMaN'>the extension's documentation</a>."
        )
        self.parent.acknowledgementText = "DAGMaN for 3D Slicer is open-source software under the Apache-2.0 licence."


class DAGMaNWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel with the input volume, model folder, device, Apply/Cancel button, progress and opacity.

    NOTE: the pytest suite checks this class only statically, by its widget names against the
    .ui file, because Qt and the Slicer application are not available there.
    """

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.job = None
        self.attentionNode = None
        self.pollTimer = None
        self.startTime = 0.0

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DAGMaN.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DAGMaNLogic()
        self.pollTimer = qt.QTimer()
        self.pollTimer.setInterval(POLL_INTERVAL_MS)
        self.pollTimer.connect("timeout()", self.onPollTimer)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateApplyButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.updateApplyButton)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.attentionOpacitySlider.connect("valueChanged(double)", self.onAttentionOpacityChanged)
        self.ui.keepResultsCheckBox.connect("toggled(bool)", self.onKeepResultsToggled)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

        self.updateApplyButton()

    def cleanup(self):
        self.cancelRunningJob()
        if self.pollTimer is not None:
            self.pollTimer.stop()
        self.removeObservers()

    def onSceneStartClose(self, caller, event):
        self.cancelRunningJob()
        self.attentionNode = None

    def updateApplyButton(self, *_):
        self.ui.inputsCollapsibleButton.enabled = self.job is None
        if self.job is not None:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Apply"
        ready = self.ui.inputVolumeSelector.currentNode() is not None and bool(self.ui.modelPathLineEdit.currentPath)
        self.ui.applyButton.enabled = ready

    def onApplyButton(self):
        if self.job is not None:
            self.ui.statusLabel.text = "Cancelling..."
            self.cancelRunningJob()
            return
        if not self.ensureDependencies():
            return

        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        self.ui.progressBar.value = 0
        try:
            self.job = self.logic.start(
                self.ui.inputVolumeSelector.currentNode(),
                self.ui.modelPathLineEdit.currentPath,
                self.ui.deviceComboBox.currentText,
                progress_callback=self.onProgress,
            )
        except (ValueError, InferenceError, OSError) as error:
            slicer.util.errorDisplay(str(error))
            return
        self.startTime = time.monotonic()
        self.updateApplyButton()
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
            self.ui.statusLabel.text = "Cancelled"
            self.ui.progressBar.value = 0
        except InferenceError as error:
            self.ui.statusLabel.text = "Failed"
            slicer.util.errorDisplay(str(error))
        else:
            self.attentionNode = outputs.attention_node
            self.logic.set_attention_opacity(self.ui.attentionOpacitySlider.value, self.attentionNode)
            self.ui.statusLabel.text = f"Done in {time.monotonic() - self.startTime:.1f} s: {outputs.summary}"
        finally:
            self.updateApplyButton()

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message

    def onKeepResultsToggled(self, checked):
        self.logic.keep_previous_results = checked

    def onAttentionOpacityChanged(self, value):
        if self.attentionNode is not None and self.attentionNode.GetScene() is not None:
            self.logic.set_attention_opacity(value, self.attentionNode)

    def cancelRunningJob(self):
        if self.job is not None:
            self.logic.cancel()

    def ensureDependencies(self):
        """Offer to install torch (through the PyTorch extension) and missing pip packages, and return whether all are there."""
        missing = missing_requirements()
        needsTorch = not torch_installed()
        if not missing and not needsTorch:
            return True

        packages = (["torch"] if needsTorch else []) + missing
        if not slicer.util.confirmOkCancelDisplay(
            "DAGMaN needs these Python packages, which are not installed yet:\n\n"
            + "\n".join(packages)
            + "\n\nInstall them now? This can take several minutes."
        ):
            return False
        with slicer.util.WaitCursor():
            if needsTorch:
                try:
                    import PyTorchUtils
                except ImportError:
                    slicer.util.errorDisplay("The PyTorch extension is missing; install it from the Extensions Manager")
                    return False
                torchLogic = PyTorchUtils.PyTorchUtilsLogic()
                if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_VERSION_REQUIREMENT) is None:
                    slicer.util.errorDisplay("PyTorch could not be installed; see the Python console for details")
                    return False
            if missing:
                slicer.util.pip_install(missing)
        return True


class DAGMaNTest(ScriptedLoadableModuleTest):
    """Runs the real inference child process with a random tiny model on a synthetic CT volume."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DAGMaN_random_tiny_bundle()

    def test_DAGMaN_random_tiny_bundle(self):
        import tempfile

        import numpy as np
        import vtk

        from dagman_core.bundle import write_random_bundle
        from DAGMaNLib.synthetic import add_synthetic_ct_volume

        self.delayDisplay("Writing a random tiny model and a synthetic CT")
        volumeNode = add_synthetic_ct_volume(slicer.mrmlScene, shape_kji=(20, 40, 44), spacing_mm=(1.6, 1.5, 3.0))
        with tempfile.TemporaryDirectory() as tempDir:
            bundle = write_random_bundle(tempDir, preset="tiny_cpu", seed=0)

            self.delayDisplay("Running DAGMaN inference in a child process")
            outputs = DAGMaNLogic().run(volumeNode, bundle, device="cpu", timeout_s=900)

        segmentation = outputs.segmentation_node.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(outputs.result.labels))
        for label in outputs.result.labels:
            self.assertNotEqual(segmentation.GetSegmentIdBySegmentName(label.name), "")

        inputMatrix = vtk.vtkMatrix4x4()
        attentionMatrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(inputMatrix)
        outputs.attention_node.GetIJKToRASMatrix(attentionMatrix)
        self.assertTrue(
            np.allclose(
                slicer.util.arrayFromVTKMatrix(inputMatrix), slicer.util.arrayFromVTKMatrix(attentionMatrix), atol=1e-4
            )
        )
        attention = slicer.util.arrayFromVolume(outputs.attention_node)
        self.assertEqual(attention.dtype, np.float32)
        self.assertGreaterEqual(float(attention.min()), 0.0)
        self.assertLessEqual(float(attention.max()), 1.0)
        self.assertEqual(outputs.attention_node.GetAttribute("DAGMaN.Layer"), "attention")
        self.assertEqual(outputs.segmentation_node.GetAttribute("DAGMaN.ModelSHA256"), outputs.result.model_sha256)
        self.delayDisplay("Test passed")
