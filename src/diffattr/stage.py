"""`python -m diffattr.stage NAME [-p key value ...]`: run one pipeline stage (see
:mod:`diffattr.stages.runner`)."""

from __future__ import annotations

import sys

from diffattr.stages.runner import main

if __name__ == "__main__":
    sys.exit(main())
