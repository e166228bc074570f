"""``python -m dalle_dist ...``: the ``dalle-dist`` command (``python -m dalle_dist.launch`` is the torchrun one)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
