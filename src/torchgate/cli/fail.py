"""`fail`: how every `torchgate` subcommand refuses: one line on stderr, exit status 2."""

from __future__ import annotations

import sys


def fail(message: str) -> int:
    print(f"torchgate: error: {message}", file=sys.stderr)
    return 2
