"""`python -m easytrain train ...` is the same as `easytrain train ...`."""

import sys

from easytrain.command import main

sys.exit(main())
