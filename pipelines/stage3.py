"""DVC stage `stage3`: a thin entry point that names the tracked metrics file (a bare
``gac stage3`` writes its metrics beside its output folder); the work is in :mod:`gac.cli.stage3`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage3", "--metrics", "metrics/stage3.json", *sys.argv[1:]]))
