#!/usr/bin/env python
"""Phrase recovery of a trained detector prompted with each val image's own caption.

    python tools/grounding_eval.py --weights output/demo/gridclip/model_final.pth \\
        --dataset gridclip_world_val --output output/grounding/gridclip.json

The code is ``gridclip_tools.grounding_eval`` (``main`` is this command; ``--help`` lists every
flag).
"""

from gridclip_tools.grounding_eval import main

if __name__ == "__main__":
    main()
