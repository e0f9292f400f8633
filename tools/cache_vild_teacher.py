#!/usr/bin/env python
"""Precompute ViLD's teacher: proposal boxes + CLIP crop embeddings for every image of a dataset.

    python tools/cache_vild_teacher.py --config-file ViLD_R50.yaml \\
        --output datasets/vild_teacher/lvis_rn50 MODEL.CLIP.WEIGHTS ~/.cache/clip/RN50.pt

The code is ``gridclip_tools.cache_vild_teacher`` (``main`` is this command; ``--help`` lists every
flag).
"""

import sys

from gridclip_tools.cache_vild_teacher import main

if __name__ == "__main__":
    main()
    sys.exit(0)
