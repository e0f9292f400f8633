#!/usr/bin/env python
"""Dump prompt-ensembled CLIP text embeddings of a vocabulary to a ``.npy`` (or ``.pt``) file.

    python tools/dump_text_embeddings.py --dataset lvis_v1_val \\
        --output datasets/metadata/lvis_v1_clip_rn50.npy MODEL.CLIP.WEIGHTS ~/.cache/clip/RN50.pt

The code is ``gridclip_tools.dump_text_embeddings`` (``main`` is this command; ``--help`` lists
every flag).
"""

import sys

from gridclip_tools.dump_text_embeddings import main

if __name__ == "__main__":
    sys.exit(main())
