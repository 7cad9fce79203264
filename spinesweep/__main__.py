"""`python -m spinesweep` is `optuna-run`."""
import sys

from .cli import main

sys.exit(main())
