#!/usr/bin/env python
"""Write the transfer set: another render of the embedded world with another vocabulary (20 of
its classes), in COCO format, for cross-dataset evaluation of the `make demo` models.

    python tools/make_transfer_set.py   # $DETECTRON2_DATASETS/gridclip_world_transfer

The code is ``gridclip_tools.transfer_set`` (``main`` is this command; ``--help`` lists every flag).
"""

import sys

from gridclip_tools.transfer_set import main

if __name__ == "__main__":
    sys.exit(main())
