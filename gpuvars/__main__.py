"""``python -m gpuvars``: see gpuvars.cli."""

import sys

from gpuvars.cli import main

sys.exit(main())
