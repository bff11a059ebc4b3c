"""``python -m learnpruner``: the ``learnpruner`` command."""

import sys

from .cli import main

sys.exit(main())
