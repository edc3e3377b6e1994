"""`python -m meml.cli` is the `meml` command (accelerate launch ... -m meml.cli train ...)."""

import sys

from meml.cli.app import main

sys.exit(main())
