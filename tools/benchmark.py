#!/usr/bin/env python
"""Benchmark GridCLIP vs the ViLD baseline vs plain Detectron2 RetinaNet, side by side.

    python tools/benchmark.py --quick               # tiny models, seconds (CI)
    python tools/benchmark.py --help                # every flag

The harness is ``gridclip_tools.benchmark`` (``cli.main`` is this command).
"""

from gridclip_tools.benchmark.cli import main

if __name__ == "__main__":
    main()
