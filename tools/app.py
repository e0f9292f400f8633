#!/usr/bin/env python
"""The interactive demo page (Gradio, an optional extra: `make app` installs it and starts it).

    python tools/app.py --weights output/demo/gridclip/model_final.pth --port 7860

The code is ``gridclip_tools.app`` (``main`` is this command; ``--help`` lists every flag).
"""

from gridclip_tools.app import main

if __name__ == "__main__":
    main()
