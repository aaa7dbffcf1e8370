"""``python -m mipp.cli``: the ``mipp`` command."""

import sys

from mipp.cli import main

sys.exit(main())
