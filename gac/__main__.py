"""``python -m gac`` is the ``gac`` command."""

import sys

from gac.cli import main

sys.exit(main())
