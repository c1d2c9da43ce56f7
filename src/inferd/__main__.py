"""``python -m inferd``: the same as the ``inferd`` command."""

from inferd.cli import main

raise SystemExit(main())
