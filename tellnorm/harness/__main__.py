"""``python -m tellnorm.harness ARGS``: lm-eval's CLI with ``--model tellnorm`` registered (see tellnorm.harness.cli)."""

import sys

from tellnorm.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
