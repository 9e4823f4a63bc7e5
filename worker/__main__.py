"""``python -m worker`` runs the ``cio-worker`` command line."""

import sys

from worker.cli import main

sys.exit(main())
