"""`python -m kvjax.train` (kept for users): the command lives in `kvjax.cli.train`."""

import sys

from kvjax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
