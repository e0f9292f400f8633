#!/usr/bin/env python
"""Evaluate several checkpoints on the same dataset and print one side-by-side table.

    python tools/compare_eval.py \\
        --run GridCLIP embedded/GridCLIP_world.yaml output/demo/gridclip/model_final.pth \\
        --run ViLD embedded/ViLD_world.yaml output/demo/vild/model_final.pth \\
        --dataset gridclip_world_val --output-dir output/compare

The code is ``gridclip_tools.compare_eval`` (``main`` is this command; ``--help`` lists every flag).
"""

from gridclip_tools.compare_eval import main

if __name__ == "__main__":
    main()
