"""`python -m kvjax.convert_fastcache` (kept for users): the command lives in `kvjax.cli.convert_fastcache`."""

import sys

from kvjax.cli.convert_fastcache import main

if __name__ == "__main__":
    sys.exit(main())
