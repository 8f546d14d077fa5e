"""``python -m tellnorm.apps.harness ARGS``: lm-eval's CLI with ``--model tellnorm`` registered (see
tellnorm.apps.harness.cli)."""

import sys

from tellnorm.apps.harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
