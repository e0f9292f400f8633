#!/usr/bin/env python
"""Cache GridCLIP's image-alignment teacher: CLIP embeddings of every training image and tiles.

    python tools/cache_teacher_embeddings.py --config-file GridCLIP_R50.yaml \\
        --output datasets/cache/gridclip_teacher_lvis_train_rn50.pt

The code is ``gridclip_tools.cache_teacher_embeddings`` (``main`` is this command; ``--help`` lists
every flag).
"""

import sys

from gridclip_tools.cache_teacher_embeddings import main

if __name__ == "__main__":
    sys.exit(0 if main() else 1)
