"""DVC stage `sweep`: a thin entry point that names the tracked metrics file (a bare
``gac sweep`` writes its metrics beside its output folder); the work is in :mod:`gac.cli.sweep`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "--metrics", "metrics/sweep.json", *sys.argv[1:]]))
