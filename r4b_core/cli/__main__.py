"""``python -m r4b_core.cli``: the same as the ``r4b`` console script."""

import sys

from r4b_core.cli.main import main

sys.exit(main())
