"""DVC stage `stage1`: a thin entry point; the work is in :mod:`gac.cli.stage1`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage1", *sys.argv[1:]]))
