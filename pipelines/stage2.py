"""DVC stage `stage2`: a thin entry point; the work is in :mod:`gac.cli.stage2`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage2", *sys.argv[1:]]))
