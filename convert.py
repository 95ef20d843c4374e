"""`python convert.py SOURCE OUT_DIR ...` in a clone: the `paligemma-convert` command without installing.

Python puts this file's folder first on the import path, so the clone's mlx_paligemma is used.
"""

import sys

from mlx_paligemma.convert import main

if __name__ == "__main__":
    sys.exit(main())
