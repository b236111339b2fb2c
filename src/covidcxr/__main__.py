"""``python -m covidcxr`` runs the command line."""

import sys

from covidcxr.cli import main

sys.exit(main())
