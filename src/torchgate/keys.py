"""`KeyStore`: API keys held only as SHA-256 digests, looked up by digest.

Keys come from a TOML file (`TORCHGATE_API_KEYS_FILE`):

    [[keys]]
    name = "app1"
    sha256 = "<hex SHA-256 of the key>"
    scopes = ["infer"]            # and/or "admin"
    rate_limit = "1000/minute"    # optional, overrides TORCHGATE_RATE_LIMIT for this key
    tokens_per_minute = 100000    # optional: text models' tokens this key may send a minute

or, for development, from `TORCHGATE_API_KEYS` (comma-separated plain keys, scope infer),
which are hashed as they are read. A plain key is never stored or logged.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pydantic

from torchgate import problems
from torchgate.config import RATE_PATTERN

Scope = Literal["infer", "admin"]


class KeyFileError(Exception):
    """The keys file cannot be used; the message names the file and the problem."""


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def is_key_name(name: str) -> bool:
    """Letters, digits and _.@-, starting with a letter or digit, at most 64 characters."""
    return _NAME.match(name) is not None


class _KeyEntry(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    name: str
    sha256: str
    scopes: list[Scope] = pydantic.Field(default_factory=lambda: ["infer"], min_length=1)
    rate_limit: str | None = None
    tokens_per_minute: int | None = pydantic.Field(None, ge=1)

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_key_name(value):
            raise ValueError("must be letters, digits and _.@- (at most 64), starting with one")
        return value

    @pydantic.field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        if not _SHA256.match(value):
            raise ValueError(
                "must be the key's SHA-256 as 64 lowercase hex digits (torchgate keys new)"
            )
        return value

    @pydantic.field_validator("rate_limit")
    @classmethod
    def _rate_limit(cls, value: str | None) -> str | None:
        if value is not None and not re.match(RATE_PATTERN, value):
            raise ValueError("must read like '1000/minute' or '10 per second'")
        return value


class _KeyFile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    keys: list[_KeyEntry] = pydantic.Field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    digest: bytes
    scopes: frozenset[str]
    rate_limit: str | None = None
    tokens_per_minute: int | None = None


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def new_key() -> str:
    """A fresh random key: 256 bits, URL-safe."""
    return "tg_" + secrets.token_urlsafe(32)


def key_file_entry(
    name: str,
    key: str,
    scopes: list[str],
    rate_limit: str | None = None,
    tokens_per_minute: int | None = None,
) -> str:
    """The TOML block for one key in the keys file."""
    lines = [
        "[[keys]]",
        f'name = "{name}"',
        f'sha256 = "{digest(key).hex()}"',
        "scopes = [" + ", ".join(f'"{s}"' for s in scopes) + "]",
    ]
    if rate_limit:
        lines.append(f'rate_limit = "{rate_limit}"')
    if tokens_per_minute:
        lines.append(f"tokens_per_minute = {tokens_per_minute}")
    return "\n".join(lines) + "\n"


class KeyStore:
    """The configured keys; `lookup` compares a presented key against every digest."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names = [k.name for k in keys]
        if len(set(names)) != len(names):
            raise KeyFileError("key names must be unique")
        self._keys = tuple(keys)
        self._by_digest = {k.digest: k for k in keys}

    def __len__(self) -> int:
        return len(self._keys)

    @classmethod
    def load(cls, file: Path | None, plain: list[str]) -> KeyStore:
        keys = [
            ApiKey(f"env-{i + 1}", digest(k), frozenset({"infer"})) for i, k in enumerate(plain)
        ]
        if file is not None:
            keys += cls._read(file)
        return cls(keys)

    @staticmethod
    def _read(file: Path) -> list[ApiKey]:
        try:
            raw = tomllib.loads(file.read_text(encoding="utf-8"))
            parsed = _KeyFile.model_validate(raw)
        except OSError as exc:
            raise KeyFileError(f"{file}: cannot read ({exc.strerror})") from None
        except tomllib.TOMLDecodeError as exc:
            raise KeyFileError(f"{file}: not valid TOML ({exc})") from None
        except pydantic.ValidationError as exc:
            raise KeyFileError(f"{file}: {problems.describe(exc)}") from None
        return [
            ApiKey(
                e.name,
                bytes.fromhex(e.sha256),
                frozenset(e.scopes),
                e.rate_limit,
                e.tokens_per_minute,
            )
            for e in parsed.keys
        ]

    def lookup(self, presented: str) -> ApiKey | None:
        """The key whose SHA-256 digest is the presented key's, by a dict lookup.

        The lookup's timing can tell only how a digest compares with the stored digests,
        and finding a key from its digest means inverting SHA-256: a constant-time scan
        of every key (what this did before) protects nothing more and costs O(keys)."""
        return self._by_digest.get(digest(presented))
