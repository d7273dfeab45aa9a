"""`python -m mmssl ...` (what torchrun launches) is the same as the `mmssl` command."""
import sys

from mmssl.cli import main

sys.exit(main())
