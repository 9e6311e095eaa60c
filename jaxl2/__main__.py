"""``python -m jaxl2``: the same as the ``jaxl2`` command."""

from jaxl2.cli import main

raise SystemExit(main())
