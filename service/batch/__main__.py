"""``python -m service.batch INPUT OUTPUT ...``: the same as ``stn batch``."""

import sys

from service.batch.cli import main

sys.exit(main())
