"""`python -m kvjax.evaluate` (kept for users): the command lives in `kvjax.cli.evaluate`."""

import sys

from kvjax.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
