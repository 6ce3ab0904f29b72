"""`python -m symshrink`: the command line."""

import sys

from symshrink.cli import main

sys.exit(main())
