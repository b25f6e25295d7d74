"""``python -m mailtls_operator.cli``: the same as the ``mailtls`` command."""

import sys

from .main import main

sys.exit(main())
