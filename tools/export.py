#!/usr/bin/env python
"""Export GridCLIP inference with a vocabulary baked in (torch.export .pt2 and ONNX).

    python tools/export.py --weights output/demo/gridclip/model_final.pth --output output/export

The code is ``gridclip_tools.export`` (``main`` is this command; ``--help`` lists every flag;
its module doc says what the exported graph takes and returns).
"""

from gridclip_tools.export import main

if __name__ == "__main__":
    main()
