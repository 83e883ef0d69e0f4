"""The pipeline's validate stage (`make validate [MODELS=models]`): `torchgate validate` on
every version of every model in a repository.

Each integer version folder is checked on its own: it must load (its file matching its
`[sha256]` pin where model.toml has one, its outputs matching the declared signature)
and, where the model has a validation.npz, pass the accuracy gate against the version
before it. Exit 0 when every version passes, 1 when any fails or the repository holds
no model.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from torchgate import cli


def versions(folder: Path) -> list[int]:
    """The folder's versions as the server sees them: integer folders with a model.pt."""
    return sorted(
        int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / "model.pt").is_file()
    )


def check(folder: Path, version: int | None) -> int:
    """`torchgate validate` on one version (None: let the command say what is missing)."""
    args = ["validate", str(folder), "--allow-missing-data"]
    if version is not None:
        args += ["--version", str(version)]
    # argparse exits on misuse; that is a failure of this version, not of the whole run
    with contextlib.suppress(SystemExit):
        return cli.main(args)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", type=Path, nargs="?", default=Path("models"))
    args = parser.parse_args(argv)
    folders = sorted(p.parent for p in args.models.glob("*/model.toml"))
    if not folders:
        print(f"validate: {args.models} holds no model folder (a folder with a model.toml)")
        return 1
    failed: list[str] = []
    checked = 0
    for folder in folders:
        for version in versions(folder) or [None]:
            checked += 1
            sys.stdout.flush()
            if check(folder, version) != 0:
                failed.append(f"{folder.name}/{version if version is not None else '?'}")
    if failed:
        print(f"validate: FAIL: {', '.join(failed)} ({len(failed)} of {checked})")
        return 1
    print(f"validate: PASS: {checked} version(s) of {len(folders)} model(s) in {args.models}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
