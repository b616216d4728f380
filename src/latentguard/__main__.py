"""``python -m latentguard`` is the same as the ``latentguard`` command."""

import sys

from latentguard.cli import main

sys.exit(main())
