"""`python cli.py ...` in a clone: the `paligemma` command without installing the package.

Python puts this file's folder first on the import path, so the clone's mlx_paligemma is used.
"""

import sys

from mlx_paligemma.cli import main

if __name__ == "__main__":
    sys.exit(main())
