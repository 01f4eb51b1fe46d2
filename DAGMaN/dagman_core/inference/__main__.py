"""``python -m dagman_core.inference``: the child process that Slicer runs."""

import sys

from .cli import main

sys.exit(main())
