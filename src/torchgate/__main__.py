"""`python -m torchgate` runs the CLI."""

from torchgate.cli import main

raise SystemExit(main())
