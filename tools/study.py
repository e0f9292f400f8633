#!/usr/bin/env python
"""Seeds x variants x novel/base splits on the embedded world: mean +- std and paired differences.

    python tools/study.py --variants gridclip gridclip_no_ila --seeds 1 2 3 --splits 0 1

The code is ``gridclip_tools.study`` (``main`` is this command; ``--help`` lists every flag).
"""

from gridclip_tools.study import main

if __name__ == "__main__":
    main()
