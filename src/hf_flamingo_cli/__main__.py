"""`python -m hf_flamingo_cli`: the `hf-flamingo` command."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
