"""``python -m lrcompile``: the command line of :mod:`lrcompile.cli`."""

from .cli import main

raise SystemExit(main())
