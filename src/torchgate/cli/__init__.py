"""The `torchgate` command: `serve` (`cli.serve`), `keys` (`cli.keys`), `validate`
(`cli.validate`)."""

from __future__ import annotations

import argparse
import os

from torchgate import __version__
from torchgate.cli import keys, serve, validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchgate", description="TorchScript model server")
    parser.add_argument("--version", action="version", version=f"torchgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parser(sub)
    keys.add_parser(sub)
    validate.add_parser(sub)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "serve":
        return serve.run(args)
    if args.command == "keys":
        return keys.run(args)
    if args.command == "validate":
        return validate.run(args)
    parser.error(f"unknown command {args.command}")
    return 2
