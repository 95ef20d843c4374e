"""`python -m mlx_paligemma` runs the `paligemma` command."""

import sys

from .cli import main

sys.exit(main())
