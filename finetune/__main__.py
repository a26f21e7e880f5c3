"""`python -m finetune ...` (and `accelerate launch -m finetune run RECIPE`)."""
import sys

from .cli import main

sys.exit(main())
