"""``python -m dynamoe ...`` is the ``moe`` command (what torchrun and the deepspeed launcher run)."""

import sys

from dynamoe.launch.cli import main

if __name__ == "__main__":
    sys.exit(main())
