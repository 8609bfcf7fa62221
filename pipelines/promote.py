"""DVC stage `promote`: a thin entry point; the work is in :mod:`gac.cli.promote`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", *sys.argv[1:]]))
