#!/usr/bin/env python
"""Train the embedded default's small CLIP on the generated world and write its report.

    python tools/train_small_clip.py                      # the shipped recipe
    python tools/train_small_clip.py --steps 200 --output /tmp/clip.pt   # a quick try

The code is ``gridclip_tools.small_clip_training`` (``main`` is this command).
"""

import sys

from gridclip_tools.small_clip_training import main

if __name__ == "__main__":
    sys.exit(main())
