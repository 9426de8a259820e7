"""`python -m flowertune_llm.evaluate ...`."""

import sys

from flowertune_llm.evaluate.cli import main

sys.exit(main())
