"""``python -m gap_pipeline`` runs the ``gap`` command."""

from gap_pipeline.cli import main

raise SystemExit(main())
