"""`python -m gdn` is the `gdn` command."""

import sys

from gdn.cli import main

sys.exit(main())
