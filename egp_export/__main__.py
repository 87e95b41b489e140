"""``python -m egp_export``: the same command line as ``egp-export``."""

import sys

from egp_export.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
