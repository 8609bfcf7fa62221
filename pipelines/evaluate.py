"""DVC stage `evaluate`: a thin entry point that names the tracked metrics file (a bare
``gac evaluate`` writes its metrics beside its output folder); the work is in :mod:`gac.cli.evaluate`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", "--metrics", "metrics/evaluate.json", *sys.argv[1:]]))
