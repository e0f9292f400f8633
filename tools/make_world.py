#!/usr/bin/env python
"""Generate the embedded world (an LVIS-format open-vocabulary detection dataset).

    python tools/make_world.py                     # $DETECTRON2_DATASETS/gridclip_world (demo)
    python tools/make_world.py --preset ci         # .../gridclip_world_ci (tiny, for tests)

The code is ``gridclip_tools.make_world`` (``main`` is this command; ``--help`` lists every flag).
"""

import sys

from gridclip_tools.make_world import main

if __name__ == "__main__":
    sys.exit(main())
