#!/usr/bin/env python
"""Precision and recall of caption pseudo-boxes on annotated images (training on pairs).

    python tools/pseudo_box_quality.py --weights output/demo/gridclip/model_final.pth

The code is ``gridclip_tools.pseudo_box_quality`` (``--help`` lists every flag).
"""

from gridclip_tools.pseudo_box_quality import main

if __name__ == "__main__":
    main()
