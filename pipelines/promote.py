"""DVC stage `promote`: a thin entry point that names the tracked metrics file (a bare
``gac promote`` prints its decisions and logs them to MLflow only); the work is in :mod:`gac.cli.promote`."""

import sys

from gac.cli import main

if __name__ == "__main__":
    sys.exit(main(["promote", "--metrics", "metrics/promote.json", *sys.argv[1:]]))
