"""``python -m emergent_seg.evaluation {eval,calibrate} ...``."""
import sys

from .cli import main

sys.exit(main())
