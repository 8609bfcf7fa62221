"""DVC stage `stage3`: a thin entry point; the work is in :mod:`gac.cli.stage3`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage3", *sys.argv[1:]]))
