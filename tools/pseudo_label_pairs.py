#!/usr/bin/env python
"""Label the pair images with a trained detector's caption pseudo-boxes (a second round).

    python tools/pseudo_label_pairs.py --weights MODEL.pth --output pseudo.json

The code is ``gridclip_tools.pseudo_label_pairs`` (``--help`` lists every flag).
"""

from gridclip_tools.pseudo_label_pairs import main

if __name__ == "__main__":
    main()
