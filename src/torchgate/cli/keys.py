"""`torchgate keys new`: a new random key, printed once, and its keys-file entry."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from torchgate.cli.fail import fail
from torchgate.config import RATE_PATTERN
from torchgate.keys import is_key_name, key_file_entry, new_key


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keys", help="manage API keys")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    new = keys_sub.add_parser("new", help="print a new random key once, and its keys-file entry")
    new.add_argument("--name", required=True, help="who the key is for (shown in logs)")
    new.add_argument(
        "--scope", action="append", choices=["infer", "admin"], help="repeatable; default infer"
    )
    new.add_argument("--rate-limit", help="this key's own limit, e.g. 1000/minute")
    new.add_argument("--key-file", type=Path, help="also write the key itself here (mode 600)")
    new.add_argument("--keys-file", type=Path, help="append the entry to this keys file")


def run(args: argparse.Namespace) -> int:
    if not is_key_name(args.name):
        return fail("--name: letters, digits and _.@- only, at most 64")
    if args.rate_limit and not re.match(RATE_PATTERN, args.rate_limit):
        return fail("--rate-limit must read like '1000/minute'")
    key = new_key()
    entry = key_file_entry(args.name, key, sorted(set(args.scope or ["infer"])), args.rate_limit)
    if args.key_file:
        args.key_file.touch(mode=0o600)
        args.key_file.write_text(key + "\n")
    if args.keys_file:
        with args.keys_file.open("a") as out:
            out.write(("\n" if args.keys_file.stat().st_size else "") + entry)
        args.keys_file.chmod(0o600)
    print(f"key (shown once, store it now): {key}")
    print("keys-file entry (TORCHGATE_API_KEYS_FILE):")
    print(entry, end="")
    return 0
