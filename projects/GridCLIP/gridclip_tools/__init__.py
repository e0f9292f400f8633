"""Tool-side modules of GridCLIP for Detectron2: what ``tools/*.py`` run, importable and tested.

The detector package (``gridclip``) holds the detector; this package holds the programs around
it: the embedded demo runner, the open-vocabulary demo, the ``--eval-only`` comparison, the
teacher-cache builders, the text-embedding dump, the world generator's command, the small CLIP's
training and evaluation, and the benchmark harness (``gridclip_tools.benchmark``). Each module
with a command line has ``main(argv=None)``; ``tools/<name>.py`` only calls it.

Nothing is imported here, so that ``import gridclip_tools.<module>`` loads only that module.
"""

import os

#: The repository root (``projects/GridCLIP/gridclip_tools`` -> three levels up).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
