"""``python -m fasterrcnn ...`` runs the command line."""

from fasterrcnn.cli import main

raise SystemExit(main())
