"""`python -m medchain ...` runs the command line, as the `medchain` script does (the simulator's
node processes start this way, so they use the interpreter and package of their parent)."""
import sys

from medchain.cli import main

sys.exit(main())
