"""DVC stage `evaluate`: a thin entry point; the work is in :mod:`gac.cli.evaluate`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
