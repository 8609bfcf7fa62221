"""DVC stage `catalog`: a thin entry point; the work is in :mod:`gac.cli.catalog`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["catalog", *sys.argv[1:]]))
