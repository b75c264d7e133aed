"""`python -m kvjax.chat` (kept for users): the command lives in `kvjax.cli.chat`."""

import sys

from kvjax.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
