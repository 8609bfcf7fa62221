"""DVC stage `catalog`: a thin entry point that names the tracked metrics file (a bare
``gac catalog`` writes its metrics beside its output folder); the work is in :mod:`gac.cli.catalog`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["catalog", "--metrics", "metrics/catalog.json", *sys.argv[1:]]))
