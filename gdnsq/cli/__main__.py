"""``python -m gdnsq.cli``: the same as the ``gdnsq`` command."""
import sys

from . import main

sys.exit(main())
