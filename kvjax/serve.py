"""`python -m kvjax.serve`: the command lives in `kvjax.cli.serve`."""

import sys

from kvjax.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
