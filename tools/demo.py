#!/usr/bin/env python
"""Detect any vocabulary on images with a trained GridCLIP or ViLD (Detectron2's demo, open-vocab).

    python tools/demo.py --input "datasets/gridclip_world/val/*.jpg" --output output/demo_vis \\
        --weights output/demo/gridclip/model_final.pth --vocabulary world_novel

The code is ``gridclip_tools.demo`` (``main`` is this command; ``--help`` lists every flag).
"""

from gridclip_tools.demo import main

if __name__ == "__main__":
    main()
