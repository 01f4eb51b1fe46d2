"""DAGMaNTrain Slicer module: export labelled CT volumes as a cohort for ``dagman finetune``.

The widget only collects the volumes and the output folder. Pairing, label values, file
writing and the datalist format are in the Qt-free ``DAGMaNTrainLib`` package, which the
pytest suite tests against slicer-core.
"""

from __future__ import annotations

import logging
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DAGMaNTrainLib import assign_validation_split, build_cases, export_cohort

logger = logging.getLogger(__name__)


class DAGMaNTrain(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and help."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DAGMaN Train"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DAGMaN for 3D Slicer contributors"]
        self.parent.helpText = (
            "Exports CT volumes and their segmentations as NRRD files with a MONAI-style datalist.json, "
            "the input of 'dagman finetune --datalist'. Each segment name becomes one label value, the same "
            "in every case. Each volume needs a segmentation made with that volume as source geometry."
        )
        self.parent.acknowledgementText = "DAGMaN for 3D Slicer is open-source software under the Apache-2.0 licence."


class DAGMaNTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel with the volume checklist, the found pairs, output folder, validation fraction and Export."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DAGMaNTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.ui.volumesSelector.connect("checkedNodesChanged()", self.updateCases)
        self.ui.outputFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateCases)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.updateCases)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeRemovedEvent, self.updateCases)
        self.updateCases()

    def cleanup(self):
        self.removeObservers()

    def updateCases(self, *_):
        volumes = self.ui.volumesSelector.checkedNodes()
        if not volumes:
            self.ui.casesLabel.text = "Check the CT volumes to export."
            self.ui.exportButton.enabled = False
            return
        try:
            cases = build_cases(volumes)
        except ValueError as error:
            self.ui.casesLabel.text = str(error)
            self.ui.exportButton.enabled = False
            return
        self.ui.casesLabel.text = "\n".join(
            f"{case.name}: {case.volume_node.GetName()} + {case.segmentation_node.GetName()}" for case in cases
        )
        self.ui.exportButton.enabled = bool(self.ui.outputFolderPathLineEdit.currentPath)

    def onExportButton(self):
        outputFolder = Path(self.ui.outputFolderPathLineEdit.currentPath)
        self.ui.outputFolderPathLineEdit.addCurrentPathToHistory()
        try:
            cases = assign_validation_split(
                build_cases(self.ui.volumesSelector.checkedNodes()), self.ui.validationFractionSpinBox.value
            )
            with slicer.util.WaitCursor():
                export = export_cohort(cases, outputFolder, progress_callback=self.onProgress)
        except (ValueError, OSError, RuntimeError) as error:
            self.ui.statusLabel.text = "Export failed"
            slicer.util.errorDisplay(str(error))
            return
        self.ui.statusLabel.text = (
            f"Wrote {len(export.case_files)} cases and {export.datalist_path}.\n"
            f"Fine-tune with: dagman finetune --datalist {export.datalist_path}"
        )

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        slicer.app.processEvents()


class DAGMaNTrainTest(ScriptedLoadableModuleTest):
    """Exports a synthetic CT with a two-segment segmentation and checks the written files."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_DAGMaNTrain_export_synthetic_case()

    def test_DAGMaNTrain_export_synthetic_case(self):
        import json
        import tempfile

        import numpy as np

        from DAGMaNLib.synthetic import add_synthetic_ct_volume

        volumeNode = add_synthetic_ct_volume(slicer.mrmlScene, name="Synthetic CT", shape_kji=(8, 16, 16))
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Synthetic segmentation")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        tumor = np.zeros((8, 16, 16), np.uint8)
        tumor[3:5, 6:10, 6:10] = 1
        segmentationNode.GetSegmentation().AddEmptySegment("Lung tumor", "Lung tumor")
        slicer.util.updateSegmentBinaryLabelmapFromArray(tumor, segmentationNode, "Lung tumor", volumeNode)

        with tempfile.TemporaryDirectory() as tempDir:
            export = export_cohort(build_cases([volumeNode]), Path(tempDir))
            datalist = json.loads(export.datalist_path.read_text(encoding="utf-8"))
            labelNode = slicer.util.loadLabelVolume(str(Path(tempDir) / datalist["training"][0]["label"]))
            self.assertTrue(np.array_equal(slicer.util.arrayFromVolume(labelNode), tumor))

        self.assertEqual(datalist["labels"], {"0": "background", "1": "Lung tumor"})
        self.assertEqual(datalist["training"][0]["image"], "cases/Synthetic_CT_image.nrrd")
        self.delayDisplay("Test passed")
