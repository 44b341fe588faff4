"""``python -m fedrad`` is the ``fedrad`` command."""

import sys

from fedrad.cli import main

sys.exit(main())
