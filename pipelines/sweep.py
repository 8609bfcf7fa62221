"""DVC stage `sweep`: a thin entry point; the work is in :mod:`gac.cli.sweep`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
