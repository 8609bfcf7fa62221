"""DVC stage `stage1`: a thin entry point that names the tracked metrics file (a bare
``gac stage1`` writes its metrics beside its output folder); the work is in :mod:`gac.cli.stage1`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["stage1", "--metrics", "metrics/stage1.json", *sys.argv[1:]]))
