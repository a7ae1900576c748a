"""``python -m gptlab`` (and ``torchrun -m gptlab``) run the gptlab command."""

import sys

from gptlab.cli import main

sys.exit(main())
