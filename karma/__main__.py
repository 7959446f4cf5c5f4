"""``python -m karma ...`` is the ``karma`` command."""
import sys

from .cli import main

sys.exit(main())
