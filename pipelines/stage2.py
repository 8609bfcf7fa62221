"""DVC stage `stage2`: a thin entry point that names the tracked metrics file (a bare
``gac stage2`` writes its metrics beside its output folder); the work is in :mod:`gac.cli.stage2`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage2", "--metrics", "metrics/stage2.json", *sys.argv[1:]]))
