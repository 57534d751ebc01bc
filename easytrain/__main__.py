"""`python -m easytrain train ...` is the same as `easytrain train ...`."""

import sys

from easytrain.cli import main

sys.exit(main())
