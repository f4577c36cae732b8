"""``python -m curvops``: the same as the ``curvops`` console script."""

import sys

from curvops.cli import main

if __name__ == "__main__":
    sys.exit(main())
