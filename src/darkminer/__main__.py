"""``python -m darkminer``: the ``darkminer`` command (as ``python -m darkminer.cli``, which launchers use)."""

import sys

from darkminer.cli import main

sys.exit(main())
