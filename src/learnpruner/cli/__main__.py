"""``python -m learnpruner.cli``: the ``learnpruner`` command (as ``python -m learnpruner``)."""

import sys

from . import main

sys.exit(main())
