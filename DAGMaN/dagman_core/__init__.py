"""Torch core of DAGMaN: co-distillation attention guided masking with a noisy teacher.

This package is shared by the Slicer modules and the headless trainer. It never imports
``slicer``, ``vtk`` or ``qt``, so it runs in a plain Python environment and inside Slicer alike.
"""

__version__ = "0.1.0"
