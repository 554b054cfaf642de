"""``python -m gen_ai_frames``: the same command line as the ``gen-ai-frames`` script.

>>> from gen_ai_frames.cli import main
>>> main(["--version"])  # doctest: +SKIP
gen-ai-frames 0.1.0
0
"""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
