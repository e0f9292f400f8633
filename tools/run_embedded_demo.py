#!/usr/bin/env python
"""The embedded default, end to end: `make demo`.

    python tools/run_embedded_demo.py --output-dir output/demo     # what `make demo` runs
    python tools/run_embedded_demo.py --preset ci --output-dir /tmp/ci   # tiny, minutes

The code is ``gridclip_tools.embedded_demo`` (``main`` is this command; ``--help`` lists every
flag).
"""

from gridclip_tools.embedded_demo import main

if __name__ == "__main__":
    main()
